# spec/support/tls_origin.py CERT KEY MODE: a one-connection HTTPS origin for spec/tls_spec.lua.
# Prints its port, serves one request with a body delimited by the close, then ends the
# connection with a close_notify (MODE "clean") or with a bare TCP FIN ("cut": what a truncation
# attacker does), and prints the ALPN protocol the client's hello offered and got selected.
import socket
import ssl
import sys

cert, key, mode = sys.argv[1:4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2", "http/1.1"])
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
raw, _ = ls.accept()
c = ctx.wrap_socket(raw, server_side=True)
alpn = c.selected_alpn_protocol()
c.recv(4096)
c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial body")
if mode == "cut":
    c.shutdown(socket.SHUT_RDWR)  # SSLSocket.shutdown: TCP only, no close_notify
else:
    c.unwrap()
c.close()
print("alpn", alpn, flush=True)
