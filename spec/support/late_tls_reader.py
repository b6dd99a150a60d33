# spec/support/late_tls_reader.py: a TLS client that asks for responses of many sizes at once over
# a Unix domain socket and reads none of them until it is told to (a line on stdin), so that the
# server finishes, and closes, while the socket's buffer is full of its last bytes. Then it reads
# each connection to its end and says how the end came: a close_notify (recv gives b"") or not
# (Python's ssl told not to take a bare EOF for an end: suppress_ragged_eofs=False, and not
# OpenSSL's OP_IGNORE_UNEXPECTED_EOF, which Debian's Python sets by default).
#
# usage: python3 late_tls_reader.py PATH CAFILE MODE SIZE,SIZE,...
#   MODE http:       GET /bytes?n=SIZE on a keep-alive connection
#        http-close: the same with Connection: close, read at once (no waiting for stdin)
#        line:       "SIZE\n", answered with SIZE bytes and a close
# prints "sent" once every request is out, then per connection, in order:
#   SIZE whole|cut close_notify|eof
import socket
import ssl
import sys

path, cafile, mode = sys.argv[1], sys.argv[2], sys.argv[3]
sizes = [int(x) for x in sys.argv[4].split(",")]
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = False  # (a Unix socket names no host: the chain is checked)
ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)

conns = []
for n in sizes:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(path)
    s = ctx.wrap_socket(raw, suppress_ragged_eofs=False)
    if mode == "line":
        s.sendall(b"%d\n" % n)
    else:
        close = b"Connection: close\r\n" if mode == "http-close" else b""
        s.sendall(b"GET /bytes?n=%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (n, close))
    conns.append((n, s))
print("sent", flush=True)
if mode != "http-close":
    sys.stdin.readline()

for n, s in conns:
    s.settimeout(20)
    data = []
    try:
        while True:
            d = s.recv(65536)
            if not d:
                end = "close_notify"
                break
            data.append(d)
    except (ssl.SSLError, OSError):  # SSLEOFError, or OpenSSL 3's "unexpected eof while reading"
        end = "eof"
    got = b"".join(data)
    if mode == "line":
        whole = len(got) == n
    else:
        head, _, body = got.partition(b"\r\n\r\n")
        whole = (b"\r\ncontent-length: %d\r\n" % n) in head.lower() + b"\r\n" and len(body) == n
    print(n, "whole" if whole else "cut", end, flush=True)
    s.close()
