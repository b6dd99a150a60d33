# spec/peers/py_server.py: a WebSocket server made with Python's websockets (Debian
# python3-websockets), for moonlet's client to talk to (spec/ws_peers_spec.lua). Run it with
# /usr/bin/python3. Prints "port N" once listening on 127.0.0.1; with CERT KEY arguments it serves
# wss:// with that certificate. Paths as spec/peers/node_server.js:
#   /echo  echo with kinds   /close  closes 4003 "py bye"   /bad-utf8  a text frame that is not
#   UTF-8   /big  sends 2 MiB
# Exits on SIGTERM, or after two minutes.
import asyncio
import ssl
import sys

import websockets


async def handler(ws, path):
    path = path.split("?")[0]
    if path == "/close":
        await ws.close(4003, "py bye")
        return
    if path == "/bad-utf8":
        await ws.write_frame(True, 0x1, b"a\xff")
    elif path == "/big":
        await ws.send(b"x" * (2 * 1024 * 1024))
    try:
        async for msg in ws:
            await ws.send(msg)
    except websockets.ConnectionClosed:
        pass


async def main():
    ctx = None
    if len(sys.argv) > 2:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    server = await websockets.serve(handler, "127.0.0.1", 0, ssl=ctx, max_size=4 * 1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    print("port %d" % port, flush=True)
    await asyncio.sleep(120)


asyncio.run(main())
