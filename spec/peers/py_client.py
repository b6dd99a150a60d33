# spec/peers/py_client.py: drives a moonlet WebSocket server with Python's websockets (Debian
# python3-websockets; run it with /usr/bin/python3) and prints one JSON object of results for
# spec/ws_peers_spec.lua. usage: py_client.py ws://127.0.0.1:PORT
# The server offers the paths that spec/peers/node_client.js expects.
import asyncio
import json
import sys

import websockets

base = sys.argv[1]
results = {}


def closed_info(ws):
    return {"code": ws.close_code, "reason": ws.close_reason}


async def main():
    async with websockets.connect(open_timeout=5, uri=base + "/echo", max_size=4 * 1024 * 1024, compression=None) as ws:
        ok = True
        for n in [0, 1, 125, 126, 127, 65535, 65536, 1 << 20]:
            text = "é" * (n >> 1) + "a" * (n & 1)
            await ws.send(text)
            ok = ok and await asyncio.wait_for(ws.recv(), 5) == text
            data = b"\xfe" * n
            await ws.send(data)
            ok = ok and await asyncio.wait_for(ws.recv(), 5) == data
        results["echo"] = ok
        await ws.send(["Hel", "lo, ", "", "world"])  # an iterable goes as fragments
        results["fragmented"] = await asyncio.wait_for(ws.recv(), 5)
        waiter = await ws.ping(b"py ping")
        await asyncio.wait_for(waiter, 5)
        results["pong"] = True
        await ws.close(4000, "bye")
        results["client_close"] = closed_info(ws)
    ws = await websockets.connect(open_timeout=5, uri=base + "/close-me")
    await ws.send("go")
    await asyncio.wait_for(ws.wait_closed(), 5)
    results["server_close"] = closed_info(ws)
    ws = await websockets.connect(open_timeout=5, uri=base + "/echo")
    await ws.write_frame(True, 0x1, b"h\xc3\x28")
    await asyncio.wait_for(ws.wait_closed(), 5)
    results["bad_utf8"] = closed_info(ws)
    ws = await websockets.connect(open_timeout=5, uri=base + "/echo")
    await ws.send(b"\x01" * ((1 << 20) + 1))
    await asyncio.wait_for(ws.wait_closed(), 5)
    results["oversize"] = closed_info(ws)
    async with websockets.connect(open_timeout=5, uri=base + "/echo-deflate") as ws:  # offers permessage-deflate
        results["deflate_ext"] = [str(e.name) for e in ws.extensions]
        big = "deflate me " * 10000
        await ws.send(big)
        results["deflate_echo"] = await asyncio.wait_for(ws.recv(), 5) == big

    async def one(i):
        async with websockets.connect(open_timeout=5, uri=base + "/echo") as w:
            for k in range(10):
                await w.send("client %d message %d" % (i, k))
                if await asyncio.wait_for(w.recv(), 10) != "client %d message %d" % (i, k):
                    return 0
        return 1

    results["concurrent"] = sum(await asyncio.gather(*[one(i) for i in range(200)]))


try:
    asyncio.run(asyncio.wait_for(main(), 60))
    print(json.dumps(results))
except Exception as e:  # report what went wrong with what was done
    results["error"] = repr(e)
    print(json.dumps(results))
    sys.exit(1)
