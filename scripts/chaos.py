#!/usr/bin/python3
"""scripts/chaos.py: a chaos soak of moonlet's lifetime rules under ASan + UBSan (not run by make test).

It starts an upstream (scripts/chaos/upstream.lua) and four servers in front of it: examples/fanout.lua,
examples/proxy.lua, apps/chat/app.lua and scripts/chaos/waits.lua (every kind of wait under route
deadlines), then hammers them with misbehaving clients, phase by phase and then all at once: requests cut
off while being sent, clients that vanish before or in the middle of the response (FIN, or RST through
SO_LINGER 0), streamed bodies cut off, WebSocket frames left half-sent, oversized frames, ping floods,
WebSockets and raw Upgrade tunnels through the proxy closed on either side or flooded without
reading; meanwhile the upstream is killed and restarted and
the servers are sent SIGHUP. After each phase every server must answer a normal request correctly, its
open-fd count (less its keep-alive connections to the upstream) must come back to its baseline, and its
stderr must hold no sanitizer report. At the end each server gets SIGTERM and must exit 0 with
LeakSanitizer clean.

    nice make -s -j2 SANITIZE=1 build-asan/moonlet
    /usr/bin/python3 scripts/chaos.py --seed 1234 --minutes 10 --clients 48

The seed is printed; the same seed replays the same choices (timing still varies). Logs go to
--logdir (a fresh temporary directory by default), one stderr file per server. Exit status 0: no
finding; 1: a finding (each is printed as "FINDING: ...").
"""
import argparse
import atexit
import base64
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = re.compile(r"ERROR: AddressSanitizer|runtime error|ERROR: LeakSanitizer|SUMMARY: |panic|"
                 r"Assertion|double free|heap-use-after-free")
LOCK = threading.Lock()
COUNTS = {}
FINDINGS = []


def count(key, n=1):
    with LOCK:
        COUNTS[key] = COUNTS.get(key, 0) + n


def finding(msg):
    with LOCK:
        FINDINGS.append(msg)
    print("FINDING: " + msg, flush=True)


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# ---------------------------------------------------------------------------------------------
# servers

class Server:
    def __init__(self, name, args, port, env, logdir, check_path=None, upstream_port=None):
        self.name, self.args, self.port, self.env = name, args, port, env
        self.logdir, self.upstream_port = logdir, upstream_port
        self.check_path = check_path
        self.proc = None
        self.baseline = None
        self.starts = 0
        self.stderr_seen = 0

    def start(self):
        self.starts += 1
        self.errpath = os.path.join(self.logdir, "%s.%d.stderr" % (self.name, self.starts))
        err = open(self.errpath, "wb")
        out = open(os.path.join(self.logdir, "%s.%d.stdout" % (self.name, self.starts)), "wb")
        self.proc = subprocess.Popen([BIN, "--port", str(self.port), "--log-level", "warn"] + self.args,
                                     cwd=ROOT, env=self.env, stdout=out, stderr=err)
        err.close()
        out.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                finding("%s exited at start with %s" % (self.name, self.proc.returncode))
                return
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        finding("%s does not listen after 30 s" % self.name)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def fds(self):
        """open fds, less sockets connected to the upstream (the keep-alive pool)"""
        pid = self.proc.pid
        inodes = {}
        for f in ("/proc/%d/net/tcp" % pid, "/proc/%d/net/tcp6" % pid):
            try:
                for line in open(f).read().splitlines()[1:]:
                    p = line.split()
                    inodes[p[9]] = int(p[2].rsplit(":", 1)[1], 16)
            except OSError:
                pass
        n, names = 0, []
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            m = re.match(r"socket:\[(\d+)\]", t)
            if m and self.upstream_port and inodes.get(m.group(1)) == self.upstream_port:
                continue
            n += 1
            names.append(t)
        return n, names

    def new_stderr(self):
        try:
            data = open(self.errpath, "rb").read()
        except OSError:
            return ""
        new = data[self.stderr_seen:]
        self.stderr_seen = len(data)
        return new.decode("utf-8", "replace")


def check_stderr(srv):
    text = srv.new_stderr()
    for line in text.splitlines():
        if BAD.search(line):
            finding("%s stderr: %s (see %s)" % (srv.name, line.strip(), srv.errpath))
            return
    errs = [l for l in text.splitlines() if "[error]" in l]
    if errs:
        count("error-log-lines:" + srv.name, len(errs))


def http_get(port, path, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path).encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    if b"chunked" in head.lower():
        body = dechunk(body)
    return status, body


def dechunk(body):
    out = b""
    while body:
        line, _, rest = body.partition(b"\r\n")
        n = int(line.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        body = rest[n + 2:]
    return out


# ---------------------------------------------------------------------------------------------
# WebSocket frames (client side: masked)

def frame(opcode, payload, fin=True, mask=True, declared=None):
    n = len(payload) if declared is None else declared
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, (0x80 if mask else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def upgrade_open(port, path, headers, timeout=5):
    """GET path with headers (an Upgrade); (socket, bytes behind the 101) or OSError("handshake: "
    + the status line of another answer)"""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, headers)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        b = s.recv(4096)
        if not b:
            s.close()
            raise OSError("closed during handshake")
        data += b
    head, _, rest = data.partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n")[0]:
        s.close()
        raise OSError("handshake: " + head.split(b"\r\n")[0].decode())
    return s, rest


def ws_open(port, path, timeout=5):
    key = base64.b64encode(os.urandom(16)).decode()
    return upgrade_open(port, path, "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                        "Sec-WebSocket-Version: 13\r\n" % key, timeout)


def tunnel_open(port, path, timeout=5):
    return upgrade_open(port, path, "Connection: Upgrade\r\nUpgrade: echo/1\r\n", timeout)


def ws_read(s, buf):
    """one frame: (opcode, payload, rest of buf)"""
    while True:
        if len(buf) >= 2:
            n = buf[1] & 0x7F
            off = 2
            if n == 126 and len(buf) >= 4:
                n = struct.unpack("!H", buf[2:4])[0]
                off = 4
            elif n == 127 and len(buf) >= 10:
                n = struct.unpack("!Q", buf[2:10])[0]
                off = 10
            if (buf[1] & 0x7F) < 126 or off > 2:
                if len(buf) >= off + n:
                    return buf[0] & 0x0F, buf[off:off + n], buf[off + n:]
        b = s.recv(65536)
        if not b:
            raise OSError("closed")
        buf += b


def vanish(s, rng):
    try:
        if rng.random() < 0.5:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            count("rst")
        else:
            count("fin")
        s.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# misbehaving HTTP clients

def read_answer(s):
    """what the server sends until it closes, 2 MB or 3 s at most (a stream may never end: an SSE
    one sends a comment every 0.5 s)"""
    data = b""
    end = time.time() + 3
    while len(data) < 2_000_000 and time.time() < end:
        b = s.recv(65536)
        if not b:
            break
        data += b
    return data


def misbehave_http(rng, port, path, method="GET", body=None):
    """one request to port, cut off at a random point"""
    req = "%s %s HTTP/1.1\r\nHost: x\r\n" % (method, path)
    if body is not None:
        req += "Content-Length: %d\r\n" % len(body)
    req = (req + "\r\n").encode() + (body or b"")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    mode = rng.choice(["partial_req", "before_resp", "mid_resp", "full", "pipelined", "slow_read",
                       "half_close"])
    count("http:" + mode)
    try:
        if mode == "partial_req":
            s.sendall(req[:rng.randrange(1, len(req))])
            time.sleep(rng.random() * 0.05)
        elif mode == "before_resp":
            s.sendall(req)
            time.sleep(rng.random() * 0.06)
        elif mode == "mid_resp":
            s.sendall(req)
            s.recv(rng.randrange(1, 200))
        elif mode == "pipelined":
            s.sendall(req * rng.randrange(2, 5))
            time.sleep(rng.random() * 0.05)
            s.recv(rng.randrange(1, 4096))
        elif mode == "half_close":  # a FIN behind the request, then the answer read whole
            s.sendall(req)
            time.sleep(rng.random() * 0.03)
            s.shutdown(socket.SHUT_WR)
            data = read_answer(s)
            if data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):  # (asked whether it was gone)
                count("http:half_close-100")
                data = data[25:]
            if not data:  # (expected only through the proxy: a FIN cancels its fetch, as nginx's)
                count("http:half_close-unanswered %s" % path)
            count("status:%s" % data[9:12].decode(errors="replace"))
        elif mode == "slow_read":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(req)
            for _ in range(rng.randrange(1, 10)):
                if not s.recv(512):
                    break
                time.sleep(0.01)
        else:
            s.sendall(req.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n", 1))
            data = read_answer(s)
            status = data[9:12].decode(errors="replace")
            count("status:%s" % status)
    except OSError:
        count("client-oserror")
    vanish(s, rng)


def chunked_upload(rng, port, path):
    """a chunked body cut off after some chunks (or finished)"""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % path).encode())
        for _ in range(rng.randrange(1, 20)):
            n = rng.randrange(1, 20000)
            s.sendall(b"%x\r\n" % n + b"u" * n + b"\r\n")
            if rng.random() < 0.2:
                time.sleep(rng.random() * 0.03)
        r = rng.random()
        if r < 0.3:
            s.sendall(b"0\r\n\r\n")
            s.recv(4096)
            count("upload:finished")
        elif r < 0.5:
            s.sendall(b"ff\r\nabc")  # a chunk cut inside
            count("upload:cut-in-chunk")
        else:
            count("upload:cut")
    except OSError:
        count("client-oserror")
    vanish(s, rng)


def length_upload(rng, port, path):
    """a Content-Length body that stops short"""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        n = rng.randrange(1000, 500000)
        s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, n)).encode())
        s.sendall(b"v" * rng.randrange(0, n))
        time.sleep(rng.random() * 0.1)
        count("upload:short")
    except OSError:
        count("client-oserror")
    vanish(s, rng)


# ---------------------------------------------------------------------------------------------
# misbehaving WebSocket clients

def misbehave_ws(rng, port, path, text=lambda i: b"hello %d" % i):
    try:
        s, buf = ws_open(port, path)
    except OSError as e:
        count("ws:open-failed")
        if "handshake: HTTP/1.1 5" in str(e) or "handshake: HTTP/1.1 4" in str(e):
            count("ws:handshake-" + str(e).split()[2])
        return
    mode = rng.choice(["echo", "partial_frame", "oversized", "ping_flood", "fragment_vanish",
                       "bad_utf8", "close", "bye", "huge_declared"])
    count("ws:" + mode)
    try:
        if mode == "echo":
            for i in range(rng.randrange(1, 20)):
                s.sendall(frame(1, text(i)))
                if rng.random() < 0.7:
                    _, _, buf = ws_read(s, buf)
        elif mode == "partial_frame":
            f = frame(rng.choice([1, 2]), os.urandom(rng.randrange(10, 3000)))
            s.sendall(f[:rng.randrange(1, len(f))])
            time.sleep(rng.random() * 0.05)
        elif mode == "oversized":
            s.sendall(frame(2, b"o" * (1 << 20) + b"xx"))  # over the 1 MiB default
            time.sleep(0.05)
        elif mode == "huge_declared":
            s.sendall(frame(2, b"h" * 100, declared=1 << 40)[:120])
            time.sleep(0.05)
        elif mode == "ping_flood":
            s.sendall(b"".join(frame(9, b"p%d" % i) for i in range(rng.randrange(50, 2000))))
            if rng.random() < 0.5:
                time.sleep(0.05)
        elif mode == "fragment_vanish":
            s.sendall(frame(1, b"part one", fin=False) + frame(0, b"part two", fin=False))
            time.sleep(rng.random() * 0.05)
        elif mode == "bad_utf8":
            s.sendall(frame(1, b"\xff\xfe bad"))
            time.sleep(0.02)
        elif mode == "close":
            s.sendall(frame(8, struct.pack("!H", 1000) + b"bye"))
            for _ in range(5):
                op, _, buf = ws_read(s, buf)
                if op == 8:
                    break
        elif mode == "bye":
            s.sendall(frame(1, b"bye"))
            time.sleep(0.02)
    except OSError:
        count("client-oserror")
    vanish(s, rng)


def misbehave_tunnel(rng, port, path):
    """an Upgrade: echo/1 tunnel through the proxy, echoed raw bytes, cut off at a random point"""
    try:
        s, rest = tunnel_open(port, path)
    except OSError as e:
        count("tunnel:refused-" + str(e)[20:23] if str(e).startswith("handshake: ") else "tunnel:open-failed")
        return
    mode = rng.choice(["echo", "flood_no_read", "bye", "half_close", "vanish_mid"])
    count("tunnel:" + mode)
    try:
        if mode == "echo":
            for i in range(rng.randrange(1, 20)):
                msg = b"m%d;" % i
                s.sendall(msg)
                got = rest
                while len(got) < len(msg):
                    b = s.recv(4096)
                    if not b:
                        raise OSError("closed")
                    got += b
                rest = got[len(msg):]
        elif mode == "flood_no_read":  # both legs' backpressure: the client never reads
            s.settimeout(0.2)
            try:
                for _ in range(rng.randrange(10, 200)):
                    s.sendall(os.urandom(65536).replace(b"bye", b"xyz"))
            except socket.timeout:
                count("tunnel:flood-blocked")
        elif mode == "bye":  # the upstream closes first
            s.sendall(b"bye")
            s.recv(4096)
        elif mode == "half_close":
            s.sendall(b"last words")
            s.shutdown(socket.SHUT_WR)
            time.sleep(rng.random() * 0.05)
        elif mode == "vanish_mid":
            s.sendall(os.urandom(rng.randrange(1, 300000)).replace(b"bye", b"xyz"))
    except OSError:
        count("client-oserror")
    vanish(s, rng)


# ---------------------------------------------------------------------------------------------
# per-server workloads and checks

def work_fanout(rng, st):
    misbehave_http(rng, st.fanout.port, rng.choice(["/fanout"] * 5 + ["/"]))


def work_proxy(rng, st):
    p = st.proxy.port
    r = rng.random()
    if r < 0.25:
        misbehave_http(rng, p, rng.choice(["/api/a", "/api/count?n=30", "/api/big", "/api/hello"]))
    elif r < 0.45:
        chunked_upload(rng, p, "/api/upload")
    elif r < 0.55:
        length_upload(rng, p, "/api/upload")
    elif r < 0.7:
        misbehave_tunnel(rng, p, "/api/tunnel")
    else:
        misbehave_ws(rng, p, "/api/echo")


def work_chat(rng, st):
    room = rng.randrange(4)
    nick = "u%d" % rng.randrange(1000)
    misbehave_ws(rng, st.chat.port, "/ws/room%d?nick=%s" % (room, nick),
                 text=lambda i: b'{"type":"message","text":"m%d"}' % i)


WAIT_PATHS = ["/sleep?t=0.1", "/sleep?t=0.01", "/timeout", "/timeout?t=0.1&s=0.01", "/any", "/any?t=0.2&ms=5",
              "/gather", "/gather?t=0.001&ms=1", "/work", "/work?ms=1", "/fs", "/fs?size=100",
              "/spawn", "/spawn?cancel=1", "/fetch", "/fetch?p=/count%3Fn%3D10", "/tcp", "/sem", "/sem?t=0.001",
              "/queue", "/queue?put=x", "/events", "/events", "/publish?m=hi"]


def work_waits(rng, st):
    p = st.waits.port
    r = rng.random()
    if r < 0.7:
        misbehave_http(rng, p, rng.choice(WAIT_PATHS))
    elif r < 0.8:
        misbehave_ws(rng, p, "/ws")
    elif r < 0.9:
        chunked_upload(rng, p, rng.choice(["/body", "/body?work=1"]))
    else:
        length_upload(rng, p, "/body")


def check_server(st, srv):
    """a normal request answered correctly; False with the reason otherwise"""
    try:
        if srv is st.fanout:
            status, body = http_get(srv.port, "/fanout", timeout=10)
            ok = status == 200 and body == b"64,1024,4096"
        elif srv is st.proxy:
            status, body = http_get(srv.port, "/api/hello?name=chaos", timeout=10)
            ok = status == 200 and b'"hello":"chaos"' in body
            if ok:
                s, buf = ws_open(srv.port, "/api/echo")
                s.sendall(frame(1, b"ping through"))
                op, data, buf = ws_read(s, buf)
                ok = op == 1 and data == b"ping through"
                s.sendall(frame(8, struct.pack("!H", 1000)))
                s.close()
                body = data
            if ok:  # and a raw upgrade tunnel
                s, data = tunnel_open(srv.port, "/api/tunnel", timeout=10)
                s.sendall(b"tunnel check")
                while len(data) < 12:
                    b = s.recv(4096)
                    if not b:
                        break
                    data += b
                ok = data == b"tunnel check"
                s.close()
                body = data
        elif srv is st.chat:
            s, buf = ws_open(srv.port, "/ws/check?nick=checker")
            op, data, buf = ws_read(s, buf)
            ok = op == 1 and b'"history"' in data
            s.sendall(frame(8, struct.pack("!H", 1000)))
            s.close()
            status, body = 101, data
        elif srv is st.upstream:
            status, body = http_get(srv.port, "/a")
            ok = status == 200 and body == b"a" * 64
        else:
            status, body = http_get(srv.port, "/ok")
            ok = status == 200 and body == b"ok"
            if ok:
                status, body = http_get(srv.port, "/gather?t=0.001&ms=1")
                ok = status in (200, 504)
        return ok, "%s %r" % (status, body[:80])
    except OSError as e:
        return False, "error %s" % e


# ---------------------------------------------------------------------------------------------

class State:
    pass


def load(st, seconds, works, clients, seed, hup=(), restart_upstream=False):
    stop = time.time() + seconds
    done = [0]

    def worker(i):
        rng = random.Random(seed * 1000 + i)
        n = 0
        while time.time() < stop:
            w = works[rng.randrange(len(works))]
            try:
                w(rng, st)
            except OSError:
                count("client-oserror")
                time.sleep(0.005)  # (refused while a server restarts: no busy loop)
            except Exception as e:  # a driver bug: keep going, but say it
                count("driver-exception:%s" % type(e).__name__)
            n += 1
        with LOCK:
            done[0] += n

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    rng = random.Random(seed)
    next_hup = time.time() + 3
    restarted = not restart_upstream
    while time.time() < stop:
        time.sleep(0.5)
        if hup and time.time() >= next_hup:
            srv = rng.choice(hup)
            if srv.alive():
                os.kill(srv.proc.pid, signal.SIGHUP)
                count("sighup:" + srv.name)
            next_hup = time.time() + 2 + rng.random() * 4
        if not restarted and time.time() > stop - seconds / 2:
            restarted = True
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            log("  upstream: %s, restart after a pause" % sig.name)
            st.upstream.proc.send_signal(sig)
            st.upstream.proc.wait()
            time.sleep(rng.random() * 2)
            st.upstream.start()
            count("upstream-restarts")
    for t in threads:
        t.join(30)
    return done[0]


def terminate(srv, sigs):
    """SIGTERM (sigs times, 0.3 s apart): must exit 0 with a clean stderr"""
    if not srv.alive():
        finding("%s was not running at SIGTERM (exit %s)" % (srv.name, srv.proc.returncode))
        check_stderr(srv)
        return
    for i in range(sigs):
        if i:
            time.sleep(0.3)
        try:
            srv.proc.send_signal(signal.SIGTERM)
        except OSError:
            pass
    try:
        rc = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        finding("%s still running 60 s after SIGTERM" % srv.name)
        srv.proc.kill()
        rc = srv.proc.wait()
    check_stderr(srv)
    if rc == -signal.SIGTERM and sigs > 1:
        # A second signal may end the process by design: while moonlet_free waits for a thread-pool
        # job, and once moonlet_free has returned (LeakSanitizer's scan at exit is such a window).
        count("ended-by-second-sigterm:" + srv.name)
    elif rc != 0:
        finding("%s exited %s after %d SIGTERM" % (srv.name, rc, sigs))
    log("  %s exit %s" % (srv.name, rc))


def after_phase(st, name, servers):
    time.sleep(1)
    for srv in servers:
        if not srv.alive():
            finding("%s died during %s (exit %s)" % (srv.name, name, srv.proc.returncode))
            check_stderr(srv)
            continue
        ok, what = check_server(st, srv)
        if not ok:
            time.sleep(2)  # (a pooled upstream connection of a killed upstream may fail once)
            ok, what = check_server(st, srv)
        if not ok:
            finding("%s after %s: a normal request fails: %s" % (srv.name, name, what))
        deadline = time.time() + 20
        n, names = srv.fds()
        while n > srv.baseline and time.time() < deadline:
            time.sleep(0.5)
            n, names = srv.fds()
        if n > srv.baseline:
            finding("%s after %s: %d fds, baseline %d: %s" % (srv.name, name, n, srv.baseline,
                                                               sorted(set(names))))
        check_stderr(srv)
        log("  %s: answers %s, fds %d (baseline %d)" % (srv.name, "ok" if ok else "WRONG", n, srv.baseline))


SERVERS = []


def kill_all():
    for srv in SERVERS:
        if srv.alive():
            srv.proc.kill()


def main():
    global BIN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build-asan/moonlet"))
    ap.add_argument("--logdir", default=None)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    BIN = a.bin
    logdir = a.logdir or tempfile.mkdtemp(prefix="moonlet-chaos.")
    os.makedirs(logdir, exist_ok=True)
    print("chaos: seed %d, %.1f minutes, %d clients, logs in %s" % (seed, a.minutes, a.clients, logdir),
          flush=True)
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=23")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env.setdefault("LSAN_OPTIONS", "suppressions=%s/spec/lsan.supp:print_suppressions=0" % ROOT)
    env["CHAOS_SEED"] = str(seed)
    fsdir = os.path.join(logdir, "fs")
    os.makedirs(fsdir, exist_ok=True)
    env["CHAOS_DIR"] = fsdir

    st = State()
    up = free_port()
    env["UPSTREAM"] = str(up)
    st.upstream = Server("upstream", ["scripts/chaos/upstream.lua"], up, env, logdir)
    st.fanout = Server("fanout", ["examples/fanout.lua", "--upstream", str(up)], free_port(), env, logdir,
                       upstream_port=up)
    st.proxy = Server("proxy", ["examples/proxy.lua", "http://127.0.0.1:%d" % up], free_port(), env, logdir,
                      upstream_port=up)
    st.chat = Server("chat", ["apps/chat/app.lua"], free_port(), env, logdir)
    st.waits = Server("waits", ["scripts/chaos/waits.lua"], free_port(), env, logdir, upstream_port=up)
    fronts = [st.fanout, st.proxy, st.chat, st.waits]
    SERVERS.extend([st.upstream] + fronts)
    atexit.register(kill_all)
    for srv in [st.upstream] + fronts:
        srv.start()
    for srv in fronts:
        ok, what = check_server(st, srv)
        if not ok:
            finding("%s does not answer at start: %s" % (srv.name, what))
            sys.exit(1)
        srv.baseline = srv.fds()[0]
        log("%s on port %d, pid %d, baseline fds %d" % (srv.name, srv.port, srv.proc.pid, srv.baseline))

    unit = a.minutes * 60 / 10
    phases = [
        ("fanout", 1.5 * unit, [work_fanout], [st.fanout], True),
        ("proxy", 2 * unit, [work_proxy], [st.proxy], True),
        ("chat", 1.5 * unit, [work_chat], [st.chat], False),
        ("waits", 2 * unit, [work_waits], [st.waits], True),
        ("all", 3 * unit, [work_fanout, work_proxy, work_chat, work_waits], fronts, True),
    ]
    total = 0
    t0 = time.time()
    for name, secs, works, servers, restart in phases:
        log("phase %s: %.0f s, %d clients" % (name, secs, a.clients))
        n = load(st, secs, works, a.clients, seed + len(name), hup=servers, restart_upstream=restart)
        total += n
        log("  %d client runs" % n)
        after_phase(st, name, servers)

    log("SIGTERM")
    for srv in fronts:
        terminate(srv, 1)

    # Then twice more, each time under load: fresh servers get SIGTERM (a graceful stop) and then,
    # the second time, a second SIGTERM (everything closed at once) while clients keep coming.
    for rnd, sigs in ((1, 1), (2, 2)):
        for srv in fronts:
            srv.start()
        log("phase term-under-load %d: %d SIGTERM" % (rnd, sigs))
        stopper = threading.Thread(target=lambda: (time.sleep(min(10, unit)), [
            terminate(srv, sigs) for srv in fronts]), daemon=True)
        stopper.start()
        total += load(st, min(10, unit) + 3, [work_fanout, work_proxy, work_chat, work_waits], a.clients,
                      seed + rnd)
        stopper.join(120)
    terminate(st.upstream, 1)
    print("chaos: seed %d, %.0f s, %d client runs" % (seed, time.time() - t0, total))
    for k in sorted(COUNTS):
        print("  %-40s %d" % (k, COUNTS[k]))
    print("chaos: %d finding(s)" % len(FINDINGS))
    for f in FINDINGS:
        print("  " + f)
    sys.exit(1 if FINDINGS else 0)


if __name__ == "__main__":
    main()
