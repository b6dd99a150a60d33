#!/bin/sh
# bench/tools/gzip_static.sh: a static CSS file (26.5 KB, made here) to a client that takes gzip,
# nginx (`gzip on`, level 6, 1 worker) against moonlet (app:static under moonlet.gzip, level 6), in
# alternating rounds: server pinned to CPU 0, `wrk -t1 -c64 -d5s` to CPU 1 after a 1 s warm-up.
# nginx compresses the file on every request; moonlet once per version of the file (its cache).
# Ad hoc, not part of `make bench`: sh bench/tools/gzip_static.sh [rounds]
set -eu
ROUNDS=${1:-3}
BIN=$(pwd)/build/moonlet
D=$(mktemp -d)
chmod 755 "$D" # nginx workers run as another user
trap 'rm -rf "$D"' EXIT
mkdir "$D/www"
awk 'BEGIN { srand(1); split("color margin padding border display flex grid font weight line height width", w)
  for (i = 0; i < 700; i++) printf ".c%d { %s: %dpx; %s: %s; }\n", i, w[int(rand()*12)+1], int(rand()*100),
    w[int(rand()*12)+1], w[int(rand()*12)+1] }' > "$D/www/site.css"
cat > "$D/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $D/nginx.pid; error_log $D/error.log;
events { worker_connections 1024; }
http { access_log off; include /etc/nginx/mime.types;
  gzip on; gzip_types text/css; gzip_comp_level 6; gzip_min_length 256;
  server { listen 127.0.0.1:18200; root $D/www; } }
CONF
cat > "$D/app.lua" <<APP
local moonlet = require "moonlet"
local app = moonlet.app()
app:use(moonlet.gzip())
app:static("/", "$D/www")
return app
APP
measure() { # name port
  curl -s -H 'Accept-Encoding: gzip' -o /dev/null -w "$1: %{http_code}, $(wc -c < "$D/www/site.css") bytes sent as %{size_download}; " \
    "http://127.0.0.1:$2/site.css"
  taskset -c 1 wrk -t1 -c64 -d1s -H 'Accept-Encoding: gzip' "http://127.0.0.1:$2/site.css" > /dev/null
  taskset -c 1 wrk -t1 -c64 -d5s --latency -H 'Accept-Encoding: gzip' "http://127.0.0.1:$2/site.css" |
    awk '/Requests\/sec/ { r = $2 } / 99%/ { p = $2 } END { print r " req/s, p99 " p }'
}
for r in $(seq "$ROUNDS"); do
  taskset -c 0 nginx -c "$D/nginx.conf" -p "$D" & NP=$!
  sleep 0.5; measure nginx 18200; kill $NP; wait $NP 2>/dev/null || true
  taskset -c 0 "$BIN" "$D/app.lua" --port 18201 > /dev/null 2>&1 & MP=$!
  sleep 0.5; measure moonlet 18201; kill $MP; wait $MP 2>/dev/null || true
done
