// spec/peers/bench_ws.js: the load generator of the WebSocket benchmark (scripts/bench.sh), on
// Node's ws. Each mode prints one JSON line.
//   echo URL CONNS SECONDS   CONNS connections each send a 32-byte text and wait for its echo, in a
//                            loop: { rtps } round trips per second over the run (after 1 s warm-up)
//   idle URL N               opens N connections and keeps them: { open } once all are open, then
//                            waits for SIGTERM (the caller samples the server's memory meanwhile)
//   broadcast BASE N ROUNDS  N connections to BASE/sub, one to BASE/pub; each round publishes one
//                            message and times until the last subscriber has it: { ms: [...] }
'use strict';
const WebSocket = require('ws');
const [mode, url, a1, a2] = process.argv.slice(2);

function open(u) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(u, { perMessageDeflate: false, handshakeTimeout: 30000 });
    ws.on('open', () => resolve(ws));
    ws.on('error', reject);
  });
}

async function openMany(u, n, batch = 200) {
  const all = [];
  for (let i = 0; i < n; i += batch) {
    const k = Math.min(batch, n - i);
    all.push(...await Promise.all(Array.from({ length: k }, () => open(u))));
  }
  return all;
}

async function echo(u, conns, secs) {
  const sockets = await openMany(u, conns);
  const msg = 'x'.repeat(32);
  let count = 0, counting = false, stop = false;
  for (const ws of sockets) {
    ws.on('message', () => {
      if (counting) count++;
      if (!stop) ws.send(msg);
    });
    ws.send(msg);
  }
  await new Promise((r) => setTimeout(r, 1000));
  counting = true;
  const t0 = process.hrtime.bigint();
  await new Promise((r) => setTimeout(r, secs * 1000));
  const dt = Number(process.hrtime.bigint() - t0) / 1e9;
  counting = false;
  stop = true;
  console.log(JSON.stringify({ rtps: Math.round(count / dt), conns }));
  sockets.forEach((ws) => ws.terminate());
}

async function idle(u, n) {
  const sockets = await openMany(u, n);
  console.log(JSON.stringify({ open: sockets.filter((w) => w.readyState === WebSocket.OPEN).length }));
  process.on('SIGTERM', () => { sockets.forEach((w) => w.terminate()); process.exit(0); });
  setTimeout(() => process.exit(0), 300000);
}

async function broadcast(base, n, rounds) {
  const subs = [];
  for (let i = 0; i < n; i += 100) {
    const k = Math.min(100, n - i);
    subs.push(...await Promise.all(Array.from({ length: k }, () => new Promise((resolve, reject) => {
      const ws = new WebSocket(base + '/sub', { perMessageDeflate: false });
      ws.once('message', () => resolve(ws)); // "ready": subscribed
      ws.on('error', reject);
    }))));
  }
  const pub = await open(base + '/pub');
  const ms = [];
  for (let r = 0; r < rounds; r++) {
    const token = 'round ' + r;
    let left = n;
    const done = new Promise((resolve) => {
      for (const ws of subs) {
        const on = (data) => {
          if (data.toString() !== token) return;
          ws.off('message', on);
          if (--left === 0) resolve();
        };
        ws.on('message', on);
      }
    });
    const t0 = process.hrtime.bigint();
    pub.send(token);
    await done;
    ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
    await new Promise((r2) => setTimeout(r2, 100));
  }
  console.log(JSON.stringify({ ms, subscribers: n }));
  subs.forEach((w) => w.terminate());
  pub.terminate();
}

const run = mode === 'echo' ? echo(url, +a1, +a2) : mode === 'idle' ? idle(url, +a1)
  : broadcast(url, +a1, +a2);
run.then(() => { if (mode !== 'idle') process.exit(0); },
         (e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(1); });
