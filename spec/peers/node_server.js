// spec/peers/node_server.js: a WebSocket server made with Node's `ws` package, for moonlet's client
// to talk to (spec/ws_peers_spec.lua). Prints "port N" once listening on 127.0.0.1. Paths:
//   /echo        echoes every message with its kind        /close     closes with 4002 "node bye"
//   /bad-utf8    sends a text frame that is not UTF-8      /big       sends 2 MiB, then waits
// permessage-deflate is accepted when the client offers it. Exits on SIGTERM, or after two minutes.
'use strict';
const { WebSocketServer } = require('ws');

const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: true,
                                  maxPayload: 4 * 1024 * 1024 });
wss.on('connection', (ws, req) => {
  const path = req.url.split('?')[0];
  ws.on('error', () => {});
  if (path === '/close') {
    ws.close(4002, 'node bye');
  } else if (path === '/bad-utf8') {
    ws._socket.write(Buffer.from([0x81, 0x02, 0x61, 0xff])); // a text frame "a\xff", written raw
  } else if (path === '/big') {
    ws.send(Buffer.alloc(2 * 1024 * 1024, 120));
  }
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
wss.on('listening', () => console.log(`port ${wss.address().port}`));
process.on('SIGTERM', () => process.exit(0));
setTimeout(() => process.exit(0), 120000);
