// spec/peers/node_client.js: drives a moonlet WebSocket server with Node's `ws` package (a strict
// peer that is not ours) and prints one JSON object of results for spec/ws_peers_spec.lua.
// usage: node node_client.js ws://127.0.0.1:PORT
// The server must offer: /echo (echo with kinds), /echo-deflate (the same with deflate on),
// /close-me (closes with 4001 "server bye" after the first message), max_message 1 MiB.
'use strict';
const WebSocket = require('ws');
const base = process.argv[2];
const results = {};

function open(path, opts) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(base + path, Object.assign({ handshakeTimeout: 5000 }, opts || {}));
    ws.on('open', () => resolve(ws));
    ws.on('error', reject);
  });
}
function next(ws) {
  return new Promise((resolve) => ws.once('message', (data, isBinary) => resolve({ data, isBinary })));
}
function closed(ws) {
  return new Promise((resolve) => ws.once('close', (code, reason) =>
    resolve({ code, reason: reason.toString() })));
}
function timeout(p, ms, what) {
  return Promise.race([p, new Promise((_, rej) => setTimeout(() => rej(new Error(what + ': timeout')), ms))]);
}

setTimeout(() => { results.error = 'took more than 60 s'; console.log(JSON.stringify(results));
                   process.exit(1); }, 60000).unref();

async function main() {
  // echo of text and binary, 0 B to 1 MiB
  let ws = await open('/echo');
  let ok = true;
  for (const n of [0, 1, 125, 126, 127, 65535, 65536, 1 << 20]) {
    const text = 'é'.repeat(n >> 1) + 'a'.repeat(n & 1);
    ws.send(text);
    let m = await timeout(next(ws), 5000, 'echo');
    ok = ok && !m.isBinary && m.data.toString() === text;
    const bin = Buffer.alloc(n, 0xfe);
    ws.send(bin);
    m = await timeout(next(ws), 5000, 'echo');
    ok = ok && m.isBinary && Buffer.compare(m.data, bin) === 0;
  }
  results.echo = ok;
  // fragmented: three frames, a ping between
  ws.send('Hel', { fin: false });
  ws.ping(Buffer.from('between'));
  ws.send('lo, ', { fin: false });
  ws.send('world', { fin: true });
  results.fragmented = (await timeout(next(ws), 5000, 'fragments')).data.toString();
  // ping/pong
  const pong = new Promise((resolve) => ws.once('pong', (d) => resolve(d.toString())));
  ws.ping(Buffer.from('node ping'));
  results.pong = await timeout(pong, 5000, 'pong');
  // close handshake started by the client
  let c = closed(ws);
  ws.close(4000, 'bye');
  results.client_close = await timeout(c, 5000, 'close');
  // close started by the server
  ws = await open('/close-me');
  c = closed(ws);
  ws.send('go');
  results.server_close = await timeout(c, 5000, 'server close');
  // invalid UTF-8 in a text message
  ws = await open('/echo');
  c = closed(ws);
  ws.send(Buffer.from([0x68, 0xc3, 0x28]), { binary: false });
  results.bad_utf8 = await timeout(c, 5000, 'utf8');
  // oversize
  ws = await open('/echo');
  c = closed(ws);
  ws.send(Buffer.alloc((1 << 20) + 1, 1));
  results.oversize = await timeout(c, 5000, 'oversize');
  // permessage-deflate
  ws = await open('/echo-deflate', { perMessageDeflate: true });
  results.deflate_ext = ws.extensions;
  const big = 'deflate me '.repeat(10000);
  ws.send(big);
  results.deflate_echo = (await timeout(next(ws), 5000, 'deflate')).data.toString() === big;
  ws.close();
  // many concurrent clients
  const N = 200;
  let good = 0;
  await Promise.all(Array.from({ length: N }, async (_, i) => {
    const w = await open('/echo');
    let mine = true;
    for (let k = 0; k < 10; k++) {
      w.send(`client ${i} message ${k}`);
      const m = await timeout(next(w), 10000, 'many');
      mine = mine && m.data.toString() === `client ${i} message ${k}`;
    }
    const cc = closed(w);
    w.close(1000);
    await cc;
    if (mine) good++;
  }));
  results.concurrent = good;
}

main().then(() => { console.log(JSON.stringify(results)); process.exit(0); },
            (e) => { results.error = String(e && e.stack || e); console.log(JSON.stringify(results)); process.exit(1); });
