// spec/peers/chat_browser.js: the browser test of apps/chat: headless Debian chromium driven by
// playwright-core opens two chat pages, one sends a message, the other must show it. Prints one
// JSON object for spec/peers/chat_spec.lua. usage: node chat_browser.js http://127.0.0.1:PORT/ [png]
'use strict';
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');

const url = process.argv[2];
const shot = process.argv[3];
const result = {};

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'moonlet-chromium-'));
  // a fresh profile directory (playwright passes it as --user-data-dir)
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30000,
  });
  try {
    const join = async (nick) => {
      const page = await browser.newPage();
      page.setDefaultTimeout(10000);
      await page.goto(url);
      await page.fill('#nick', nick);
      await page.fill('#room', 'browsers');
      await page.click('#join-button');
      await page.waitForSelector('#say:not([hidden])');
      return page;
    };
    const alice = await join('alice');
    const bob = await join('bob');
    await alice.waitForSelector('#log li:has-text("bob joined")');
    await alice.fill('#text', 'hello from alice');
    await alice.click('#send');
    await bob.waitForSelector('#log li.message:has-text("hello from alice")');
    result.bob_sees = await bob.textContent('#log li.message:last-child');
    result.alice_sees = await alice.textContent('#log li.message:last-child');
    await bob.close();
    await alice.waitForSelector('#log li:has-text("bob left")');
    result.left_notice = true;
    if (shot) await alice.screenshot({ path: shot });
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

setTimeout(() => { result.error = 'took more than 90 s'; console.log(JSON.stringify(result));
                   process.exit(1); }, 90000).unref();
main().then(() => { console.log(JSON.stringify(result)); process.exit(0); },
            (e) => { result.error = String(e && e.stack || e); console.log(JSON.stringify(result));
                     process.exit(1); });
