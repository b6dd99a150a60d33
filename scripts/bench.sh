#!/bin/sh
# scripts/bench.sh: what `make bench` runs. Benchmarks moonlet beside its peers (nginx+lua, i.e.
# OpenResty's engine, nginx static, a raw libuv floor, node) with the shared harness peers.sh
# (../shared/bench/peers.sh, or $BENCH_PEERS; read-only, used in place): server on CPU 0, wrk on CPU 1.
# moonlet serves examples/bench_hello.lua (GET / only, no middleware: the peers' work), the README's
# app examples/hello.lua too (peer moonlet-readme: GET / through one middleware), and in the
# fan-out scenarios examples/fanout.lua (GET /fanout: /a /b /c from the upstream in parallel).
# Then it prints a short summary (moonlet's req/s as a ratio of nginx-lua's, p99 beside nginx-lua's,
# idle RSS, bytes per idle connection) and saves it, with the command line and the date, to
# bench/results/latest.md.
#
# Environment (defaults): BENCH_ONLY (nginx-lua,nginx-static,uvfloor,node), BENCH_ROUNDS (3),
# BENCH_SCENARIOS (hello,pipelined,fanout,idle), BENCH_DURATION (5s), BENCH_RUN (/tmp/moonlet-peers: peers.sh's
# scratch folder), BENCH_PEERS (path of peers.sh), BENCH_TIMEOUT (3600: seconds for the whole run),
# BENCH_WS (1: the WebSocket section after the HTTP one; "only": that section alone; 0: skip it).
# BENCH_DB (1: the PostgreSQL section, TechEmpower-style, at the end; "only": alone; 0: skip it).
# BENCH_EQUAL (1: moonlet and nginx+lua at equal load, scripts/bench_equal_load.sh, after the
# peers' run: hello latency, server CPU per fan-out; "only": alone; 0: skip it).
# BENCH_LOG (1: hello with the access log on, moonlet beside nginx+lua, scripts/bench_access_log.sh,
# after the equal-load section; "only": alone; 0: skip it).
# BENCH_PROXY (1: moonlet.proxy beside nginx's proxy_pass, scripts/bench_proxy.sh, after the
# access-log section: GET /p/b through each to peers.sh's upstream; "only": alone; 0: skip it).
# Extra arguments are passed to peers.sh as they are (after ours, so they win: e.g. --conns 128).
# Missing peer packages are installed with `peers.sh --install` (apt-get, needs root); peers that
# still lack something are left out of the run with a warning.
set -eu

die() { echo "bench.sh: $*" >&2; exit 2; }
warn() { echo "bench.sh: $*" >&2; }
q() {  # q ARG -> ARG quoted for a shell when it needs it
  case "$1" in
    *[!A-Za-z0-9_./=,:+@%-]* | "") printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${BENCH_PEERS:-}" ]; then
  case "$BENCH_PEERS" in /*) PEERS_SH=$BENCH_PEERS ;; *) PEERS_SH=$(pwd)/$BENCH_PEERS ;; esac
else
  PEERS_SH=../shared/bench/peers.sh      # relative to the repo root (we cd there below)
fi
cd "$ROOT"
[ -f "$PEERS_SH" ] || die "the peer harness peers.sh is not at $PEERS_SH
  (expected ../shared/bench/peers.sh beside the repo, i.e. $(cd .. && pwd)/shared/bench/peers.sh;
   set BENCH_PEERS=/path/to/peers.sh to use another one)"
[ -x build/moonlet ] || die "build/moonlet is missing: run \`make\` first (or \`make bench\`)"
[ -f examples/bench_hello.lua ] || die "examples/bench_hello.lua is missing"
[ -f examples/fanout.lua ] || die "examples/fanout.lua is missing"
command -v bash >/dev/null || die "peers.sh needs bash"
command -v timeout >/dev/null || die "needs timeout (coreutils)"

# ------------------------------------------------------------ WebSockets
# BENCH_WS: 1 (default) runs this section after the HTTP one, "only" runs it alone, 0 skips it.
# The load generator is spec/peers/bench_ws.js (Node's ws, on CPU 1); each server runs on CPU 0:
# (1) echo round trips per second over 100 connections: moonlet (spec/peers/bench_ws_app.lua), Node's
#     ws (spec/peers/node_server.js) and nginx+lua with lua-resty-websocket (Debian ships it as
#     lua-nginx-websocket, which depends on nginx-extras, a replacement of the nginx in use: its .deb
#     is unpacked into the scratch folder instead, and the modules of libnginx-mod-http-lua load it);
# (2) memory per idle WebSocket with 10,000 open (RSS growth / 10,000; moonlet and node);
# (3) moonlet broadcasting one message to 1,000 channel subscribers: time until the last has it.
# The table goes to stdout and bench/results/websocket.md.
ws_bench() {
  if ! command -v node >/dev/null 2>&1 || [ ! -f spec/peers/node_modules/ws/package.json ]; then
    warn "WebSocket section skipped: node or spec/peers/node_modules/ws is missing (sh scripts/deps.sh)"
    return 0
  fi
  WSDIR=$BENCH_RUN/ws-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$WSDIR"
  ulimit -n 65536 2>/dev/null || ulimit -n 30000 2>/dev/null || true
  CL="timeout 300 taskset -c 1 node spec/peers/bench_ws.js"
  ws_port() {  # ws_port LOG -> the port a server printed ("on http://host:N" or "port N")
    i=0
    while [ $i -lt 200 ]; do
      p=$(sed -n 's/.*on http:\/\/[^ ]*:\([0-9][0-9]*\).*/\1/p; s/^port \([0-9][0-9]*\)$/\1/p' "$1" | head -1)
      [ -n "$p" ] && { echo "$p"; return 0; }
      sleep 0.1; i=$((i + 1))
    done
    return 1
  }
  ws_rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
  ws_idle() {  # ws_idle PID URL -> "kB_before kB_after open" with 10,000 idle connections
    b=$(ws_rss "$1")
    $CL idle "$2" 10000 > "$WSDIR/idle.out" 2>&1 &
    ipid=$!
    i=0
    while [ $i -lt 1200 ] && ! grep -q '"open"' "$WSDIR/idle.out"; do sleep 0.1; i=$((i + 1)); done
    sleep 1
    a=$(ws_rss "$1")
    o=$(sed -n 's/.*"open":\([0-9]*\).*/\1/p' "$WSDIR/idle.out")
    kill "$ipid" 2>/dev/null; wait "$ipid" 2>/dev/null
    echo "$b $a ${o:-0}"
  }
  # moonlet
  taskset -c 0 ./build/moonlet spec/peers/bench_ws_app.lua --port 0 > "$WSDIR/moonlet.log" 2>&1 &
  mpid=$!
  if mport=$(ws_port "$WSDIR/moonlet.log"); then
    $CL echo "ws://127.0.0.1:$mport/echo" 100 5 > "$WSDIR/moonlet-echo.json" 2>&1
    ws_idle "$mpid" "ws://127.0.0.1:$mport/echo" > "$WSDIR/moonlet-idle.txt"
    sleep 1
    $CL broadcast "ws://127.0.0.1:$mport" 1000 7 > "$WSDIR/moonlet-broadcast.json" 2>&1
  else
    warn "moonlet did not start (log: $WSDIR/moonlet.log)"
  fi
  kill "$mpid" 2>/dev/null; wait "$mpid" 2>/dev/null
  # Node's ws
  taskset -c 0 node spec/peers/node_server.js > "$WSDIR/node.log" 2>&1 &
  npid=$!
  if nport=$(ws_port "$WSDIR/node.log"); then
    $CL echo "ws://127.0.0.1:$nport/echo" 100 5 > "$WSDIR/node-echo.json" 2>&1
    ws_idle "$npid" "ws://127.0.0.1:$nport/echo" > "$WSDIR/node-idle.txt"
  fi
  kill "$npid" 2>/dev/null; wait "$npid" 2>/dev/null
  # nginx + lua-resty-websocket
  if command -v nginx >/dev/null 2>&1 && [ -f /usr/share/nginx/modules/ngx_http_lua_module.so ] &&
     (cd "$WSDIR" && timeout 120 apt-get download lua-nginx-websocket >/dev/null 2>&1) &&
     dpkg -x "$WSDIR"/lua-nginx-websocket_*.deb "$WSDIR/lrw" 2>/dev/null; then
    gport=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$WSDIR/nginx/logs"
    cat > "$WSDIR/nginx/nginx.conf" <<NGX
worker_processes 1;
daemon off;
error_log stderr warn;
pid $WSDIR/nginx/nginx.pid;
load_module /usr/share/nginx/modules/ndk_http_module.so;
load_module /usr/share/nginx/modules/ngx_http_lua_module.so;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $WSDIR/nginx; proxy_temp_path $WSDIR/nginx; fastcgi_temp_path $WSDIR/nginx;
  uwsgi_temp_path $WSDIR/nginx; scgi_temp_path $WSDIR/nginx;
  lua_package_path "$WSDIR/lrw/usr/share/lua/5.1/?.lua;;";
  server {
    listen 127.0.0.1:$gport;
    location /echo {
      content_by_lua_block {
        local server = require "nginx.websocket.server"
        local wb = server:new({ timeout = 300000, max_payload_len = 1048576 })
        if not wb then return ngx.exit(444) end
        while true do
          local data, typ = wb:recv_frame()
          if not data then return end
          if typ == "close" then wb:send_close() return
          elseif typ == "ping" then wb:send_pong(data)
          elseif typ == "text" then wb:send_text(data)
          elseif typ == "binary" then wb:send_binary(data) end
        end
      }
    }
  }
}
NGX
    echo "port $gport" > "$WSDIR/nginx.port"
    taskset -c 0 nginx -p "$WSDIR/nginx" -c "$WSDIR/nginx/nginx.conf" > "$WSDIR/nginx.log" 2>&1 &
    gpid=$!
    sleep 1
    $CL echo "ws://127.0.0.1:$gport/echo" 100 5 > "$WSDIR/nginx-echo.json" 2>&1
    kill "$gpid" 2>/dev/null; wait "$gpid" 2>/dev/null
  else
    echo '{"error": "lua-nginx-websocket could not be fetched, or nginx+lua is missing"}' > "$WSDIR/nginx-echo.json"
  fi
  "$PY" - "$WSDIR" "$(date -u '+%Y-%m-%d %H:%M UTC')" > bench/results/websocket.md <<'PYEOF'
import json, os, statistics, sys
d, date = sys.argv[1:3]
def js(name):
    try:
        lines = [l for l in open(os.path.join(d, name)) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": "no result"}
    except OSError:
        return {"error": "not run"}
def idle(name):
    try:
        b, a, o = open(os.path.join(d, name)).read().split()
        return (int(a) - int(b)) * 1024 / max(int(o), 1), int(o)
    except (OSError, ValueError):
        return None, 0
def rt(r):
    return f"{r['rtps']:,}" if "rtps" in r else "n/a (" + r.get("error", "?")[:60] + ")"
m, n, g = js("moonlet-echo.json"), js("node-echo.json"), js("nginx-echo.json")
mi, mo = idle("moonlet-idle.txt")
ni, no = idle("node-idle.txt")
b = js("moonlet-broadcast.json")
print("# WebSockets (`make bench`, WebSocket section)\n")
print(f"Date: {date}. Raw results: `{d}`. Server on CPU 0, load generator (Node's ws, "
      "spec/peers/bench_ws.js) on CPU 1; 2 vCPUs shared with other tenants: compare within a run.\n")
print("| metric | moonlet | Node ws | nginx+lua (lua-resty-websocket) |")
print("|---|---|---|---|")
print(f"| echo round trips/s, 100 connections, 32-byte text | {rt(m)} | {rt(n)} | {rt(g)} |")
f = lambda v: "n/a" if v is None else f"{v:,.0f}"
print(f"| memory per idle WebSocket, 10,000 open (bytes) | {f(mi)} ({mo} open) | {f(ni)} ({no} open) | not measured |")
if "ms" in b:
    ms = b["ms"]
    print(f"| broadcast to 1,000 subscribers: until the last has it (ms, median of {len(ms)}) "
          f"| {statistics.median(ms):.1f} (min {min(ms):.1f}, max {max(ms):.1f}) | | |")
else:
    print(f"| broadcast to 1,000 subscribers | n/a ({b.get('error', '?')[:60]}) | | |")
PYEOF
  echo
  echo "================ WebSockets ================"
  cat bench/results/websocket.md
}
# ------------------------------------------------------------ PostgreSQL (TechEmpower-style)
# BENCH_DB: 1 (default) runs this section at the end, "only" runs it alone, 0 skips it.
# A private PostgreSQL cluster (initdb in the scratch folder, as the `postgres` user when root) with
# TechEmpower's `world` table (10,000 rows); each server on CPU 0, wrk on CPU 1, 64 connections,
# every server with a pool of 16: "single query" (GET /db) and "multiple queries" (GET
# /queries?queries=20) from moonlet (moonlet.pg), aiohttp + asyncpg and Node's http + pg (npm,
# installed in the scratch folder). The table goes to stdout and bench/results/db.md.
db_bench() {
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
    warn "PostgreSQL section skipped: no server binaries (sh scripts/deps.sh installs postgresql)"
    return 0
  fi
  if [ "$(id -u)" = 0 ] && ! /usr/bin/python3 -c 'import aiohttp, asyncpg' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends \
      python3-aiohttp python3-asyncpg >/dev/null 2>&1 || warn "could not install python3-aiohttp python3-asyncpg"
  fi
  DBDIR=$BENCH_RUN/db-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$DBDIR"
  DUR=${BENCH_DURATION:-5s}
  free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  AS=""
  if [ "$(id -u)" = 0 ]; then chown postgres "$DBDIR"; AS="runuser -u postgres --"; fi
  PGPORT=$(free_port)
  if ! $AS "$PGBIN/initdb" -D "$DBDIR/pgdata" -A trust -U postgres --no-sync -E UTF8 > "$DBDIR/initdb.log" 2>&1 ||
     ! $AS "$PGBIN/pg_ctl" -D "$DBDIR/pgdata" -l "$DBDIR/postgres.log" -w -t 30 \
       -o "-p $PGPORT -k $DBDIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
       start > /dev/null 2>&1; then
    warn "PostgreSQL section skipped: the server did not start (logs in $DBDIR)"
    return 0
  fi
  DATABASE_URL="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
  export DATABASE_URL
  "$PGBIN/psql" "$DATABASE_URL" -q -c "CREATE TABLE world(id integer PRIMARY KEY,
    randomnumber integer NOT NULL); INSERT INTO world SELECT i, 1 + (random() * 9999)::int
    FROM generate_series(1, 10000) i; ANALYZE world;" > "$DBDIR/psql.log" 2>&1
  cat > "$DBDIR/moonlet_db.lua" <<'LUAEOF'
local moonlet = require "moonlet"
local random, floor, tonumber = math.random, math.floor, tonumber
math.randomseed(os.time())
local pg = moonlet.pg.pool{ url = os.getenv("DATABASE_URL"), size = 16 }
local SQL = "SELECT id, randomnumber FROM world WHERE id = $1"
local app = moonlet.app()
app:get("/db", function()
    local r = pg:query(SQL, random(1, 10000))[1]
    return { id = r.id, randomNumber = r.randomnumber }
end)
app:get("/queries", function(req)
    local n = tonumber(req.query.queries) or 1
    n = n ~= n and 1 or floor(n < 1 and 1 or n > 500 and 500 or n)
    local out = {}
    for i = 1, n do
        local r = pg:query(SQL, random(1, 10000))[1]
        out[i] = { id = r.id, randomNumber = r.randomnumber }
    end
    return out
end)
return app
LUAEOF
  cat > "$DBDIR/aiohttp_db.py" <<'PYSRV'
import os, random, sys
import asyncpg
from aiohttp import web
SQL = "SELECT id, randomnumber FROM world WHERE id = $1"
async def init(app):
    app["pool"] = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=16, max_size=16)
async def db(request):
    async with request.app["pool"].acquire() as conn:
        r = await conn.fetchrow(SQL, random.randint(1, 10000))
    return web.json_response({"id": r["id"], "randomNumber": r["randomnumber"]})
async def queries(request):
    try:
        n = int(request.query.get("queries", "1"))
    except ValueError:
        n = 1
    n = min(max(n, 1), 500)
    out = []
    async with request.app["pool"].acquire() as conn:
        for _ in range(n):
            r = await conn.fetchrow(SQL, random.randint(1, 10000))
            out.append({"id": r["id"], "randomNumber": r["randomnumber"]})
    return web.json_response(out)
app = web.Application()
app.on_startup.append(init)
app.router.add_get("/db", db)
app.router.add_get("/queries", queries)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
PYSRV
  cat > "$DBDIR/node_db.js" <<'JSEOF'
const http = require("http");
const { Pool } = require("pg");
const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 16 });
const SQL = { name: "world", text: "SELECT id, randomnumber FROM world WHERE id = $1" };
const one = async () => {
  const r = (await pool.query({ ...SQL, values: [1 + Math.floor(Math.random() * 10000)] })).rows[0];
  return { id: r.id, randomNumber: r.randomnumber };
};
http.createServer(async (req, res) => {
  try {
    const u = new URL(req.url, "http://x");
    let body;
    if (u.pathname === "/db") body = await one();
    else if (u.pathname === "/queries") {
      let n = parseInt(u.searchParams.get("queries") || "1", 10);
      n = Math.min(Math.max(isNaN(n) ? 1 : n, 1), 500);
      body = [];
      for (let i = 0; i < n; i++) body.push(await one());
    } else { res.writeHead(404); return res.end(); }
    const s = JSON.stringify(body);
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(s) });
    res.end(s);
  } catch (e) { res.writeHead(500); res.end(String(e)); }
}).listen(+process.argv[2], "127.0.0.1");
JSEOF
  if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    (cd "$DBDIR" && timeout 300 npm install --no-audit --no-fund --silent pg@8 > npm.log 2>&1) ||
      warn "npm install pg failed: Node + pg left out (log: $DBDIR/npm.log)"
  fi
  # db_run NAME CMD... : starts the server (its port in $P), loads both endpoints, stops it
  db_run() {
    name=$1; shift
    taskset -c 0 "$@" > "$DBDIR/$name.log" 2>&1 &
    spid=$!
    i=0
    while [ $i -lt 100 ] && ! curl -sf "http://127.0.0.1:$P/db" > /dev/null 2>&1; do sleep 0.1; i=$((i + 1)); done
    for ep in db "queries?queries=20"; do
      f=$DBDIR/$name-$(echo "$ep" | cut -c1-7).wrk
      if curl -sf "http://127.0.0.1:$P/$ep" > /dev/null 2>&1; then
        taskset -c 1 wrk -t1 -c64 -d"$DUR" "http://127.0.0.1:$P/$ep" > "$f" 2>&1
      else
        echo "not running" > "$f"
      fi
    done
    kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null || true
  }
  P=$(free_port); db_run moonlet ./build/moonlet "$DBDIR/moonlet_db.lua" --port "$P" --log-level warn
  if /usr/bin/python3 -c 'import aiohttp, asyncpg' 2>/dev/null; then
    P=$(free_port); db_run aiohttp /usr/bin/python3 "$DBDIR/aiohttp_db.py" "$P"
  fi
  if [ -d "$DBDIR/node_modules/pg" ]; then
    P=$(free_port); (cd "$DBDIR" && db_run node node "$DBDIR/node_db.js" "$P")
  fi
  $AS "$PGBIN/pg_ctl" -D "$DBDIR/pgdata" -m fast -w stop > /dev/null 2>&1 || true
  "$PY" - "$DBDIR" "$(date -u '+%Y-%m-%d %H:%M UTC')" > bench/results/db.md <<'PYEOF'
import os, re, sys
d, date = sys.argv[1:3]
def rps(name, ep):
    try:
        t = open(os.path.join(d, f"{name}-{ep}.wrk")).read()
    except OSError:
        return None
    m = re.search(r"Requests/sec:\s+([\d.]+)", t)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    return float(m.group(1)) if m and not bad else None
peers = [("moonlet", "moonlet (moonlet.pg)"), ("aiohttp", "aiohttp + asyncpg"), ("node", "Node http + pg")]
print("# PostgreSQL, TechEmpower-style (`make bench`, PostgreSQL section)\n")
print(f"Date: {date}. Raw results: `{d}`. One private PostgreSQL (fsync off), the `world` table of "
      "10,000 rows; each server is one process on CPU 0 with a pool of 16 connections, wrk on CPU 1 "
      "with 64 connections; 2 vCPUs shared with the database and other tenants: compare within a run.\n")
print("| endpoint | " + " | ".join(p[1] for p in peers) + " | moonlet ÷ best other |")
print("|---|" + "---|" * (len(peers) + 1))
for ep, label in (("db", "single query (/db), req/s"), ("queries", "20 queries (/queries?queries=20), req/s")):
    vals = [rps(p[0], ep) for p in peers]
    others = [v for v in vals[1:] if v]
    ratio = f"**{vals[0] / max(others):.2f}**" if vals[0] and others else "n/a"
    print(f"| {label} | " + " | ".join(f"{v:,.0f}" if v else "n/a" for v in vals) + f" | {ratio} |")
PYEOF
  echo
  echo "================ PostgreSQL ================"
  cat bench/results/db.md
}
if [ "${BENCH_DB:-1}" = only ]; then
  mkdir -p "${BENCH_RUN:-/tmp/moonlet-peers}" bench/results
  BENCH_RUN=${BENCH_RUN:-/tmp/moonlet-peers}
  PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
  [ -x build/moonlet ] || die "build/moonlet is missing: run \`make\` first"
  db_bench
  exit 0
fi

if [ "${BENCH_EQUAL:-1}" = only ]; then
  BENCH_PEERS=$PEERS_SH sh scripts/bench_equal_load.sh
  exit 0
fi

if [ "${BENCH_LOG:-1}" = only ]; then
  BENCH_PEERS=$PEERS_SH sh scripts/bench_access_log.sh
  exit 0
fi

if [ "${BENCH_PROXY:-1}" = only ]; then
  BENCH_PEERS=$PEERS_SH sh scripts/bench_proxy.sh
  exit 0
fi

if [ "${BENCH_WS:-1}" = only ]; then
  mkdir -p "${BENCH_RUN:-/tmp/moonlet-peers}" bench/results
  BENCH_RUN=${BENCH_RUN:-/tmp/moonlet-peers}
  PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
  [ -x build/moonlet ] || die "build/moonlet is missing: run \`make\` first"
  ws_bench
  exit 0
fi

ENVLINE=""                               # the BENCH_* settings given, for the record
for v in BENCH_ONLY BENCH_ROUNDS BENCH_SCENARIOS BENCH_DURATION BENCH_RUN BENCH_PEERS BENCH_TIMEOUT; do
  eval "val=\${$v-}"
  [ -z "$val" ] || ENVLINE="$ENVLINE$v=$(q "$val") "
done
ONLY=${BENCH_ONLY:-nginx-lua,nginx-static,uvfloor,node}
ROUNDS=${BENCH_ROUNDS:-3}
SCENARIOS=${BENCH_SCENARIOS:-hello,pipelined,fanout,idle}
DURATION=${BENCH_DURATION:-5s}
TOTAL_TIMEOUT=${BENCH_TIMEOUT:-3600}
BENCH_RUN=${BENCH_RUN:-/tmp/moonlet-peers}
export BENCH_RUN
PY=/usr/bin/python3                      # peers.sh writes its report with Debian's python3 too
[ -x "$PY" ] || PY=python3
MOONLET_CMD='./build/moonlet examples/bench_hello.lua --port {PORT} --log-level warn'
MOONLET_FANOUT_CMD='./build/moonlet examples/fanout.lua --port {PORT} --upstream {UPSTREAM} --log-level warn'
# the fully static executable of `make static` (same app) is a second extra peer in hello,
# pipelined and idle, when it is built (`make bench` builds it)
STATIC_CMD='./build/moonlet-static examples/bench_hello.lua --port {PORT} --log-level warn'
STATIC_ARGS=""
[ -x build/moonlet-static ] && STATIC_ARGS=yes
# the README's app, examples/hello.lua (four routes, one middleware that sets X-Time, a static
# mount), is a third extra peer: its GET / is what issue #2's targets name
README_APP_CMD='./build/moonlet examples/hello.lua --port {PORT} --log-level warn'

# ------------------------------------------------------------ what each peer needs
# tools peers.sh refuses to run without, whatever the peers
missing_tools() {
  m=""
  for t in wrk taskset curl nginx node cc; do command -v "$t" >/dev/null 2>&1 || m="$m $t"; done
  [ -x /usr/bin/python3 ] || m="$m /usr/bin/python3"
  echo "$m"
}
peer_ok() {  # peer_ok NAME -> 0 when what NAME needs is installed
  case "$1" in
    nginx-static) command -v nginx >/dev/null 2>&1 ;;
    nginx-lua) command -v nginx >/dev/null 2>&1 &&
      [ -f /usr/share/nginx/modules/ngx_http_lua_module.so ] &&
      [ -f /usr/share/nginx/modules/ndk_http_module.so ] ;;
    node) command -v node >/dev/null 2>&1 ;;
    uvfloor) printf '#include <uv.h>\n' | timeout 60 cc -E -x c - >/dev/null 2>&1 ;;
    aiohttp | tornado | twisted) timeout 60 /usr/bin/python3 -c "import $1" >/dev/null 2>&1 ;;
    luahttp) timeout 60 luajit -e 'require "http.server"; require "cqueues"' >/dev/null 2>&1 ;;
    *) return 0 ;;                       # unknown to us: let peers.sh judge
  esac
}
missing_peers() {
  m=""
  for p in $(echo "$ONLY" | tr ',' ' '); do peer_ok "$p" || m="$m $p"; done
  echo "$m"
}

if [ -n "$(missing_tools)$(missing_peers)" ]; then
  warn "missing:$(missing_tools)$(missing_peers); installing the peers' packages (peers.sh --install)"
  # --install apt-gets every peer's packages then runs; an empty --only/--scenarios makes the run a no-op.
  if ! timeout --foreground -k 30 1200 bash "$PEERS_SH" --install --only none --scenarios none >/dev/null; then
    warn "peers.sh --install failed (see above); going on with the peers that are installed"
  fi
fi
mt=$(missing_tools)
[ -z "$mt" ] || die "peers.sh needs:$mt (apt-get install as root, see $(dirname "$PEERS_SH")/README.md)"
mp=$(missing_peers)
if [ -n "$mp" ]; then
  keep=""
  for p in $(echo "$ONLY" | tr ',' ' '); do
    case " $mp " in *" $p "*) ;; *) keep="${keep:+$keep,}$p" ;; esac
  done
  warn "leaving out peers whose packages are missing:$mp"
  ONLY=${keep:-none}
fi
case ",$ONLY," in *,nginx-lua,*) ;; *) warn "nginx-lua is not in the run: the ratios will be n/a" ;; esac

# ------------------------------------------------------------ the run
PASS=""
for a in "$@"; do PASS="$PASS $(q "$a")"; done
set -- --only "$ONLY" --scenarios "$SCENARIOS" --rounds "$ROUNDS" --duration "$DURATION" \
  --extra "moonlet=$MOONLET_CMD" --extra-fanout "moonlet=$MOONLET_FANOUT_CMD" "$@"
[ -z "$STATIC_ARGS" ] || set -- "$@" --extra "moonlet-static=$STATIC_CMD"
set -- "$@" --extra "moonlet-readme=$README_APP_CMD"
CMDLINE="bash $(q "$PEERS_SH")"
for a in "$@"; do CMDLINE="$CMDLINE $(q "$a")"; done
if [ -n "${MAKELEVEL:-}" ]; then OUTER="${ENVLINE}make bench"; else OUTER="${ENVLINE}sh scripts/bench.sh$PASS"; fi

mkdir -p "$BENCH_RUN" bench/results
STAMP=$(date +%Y%m%d-%H%M%S)
LOG=$BENCH_RUN/bench-sh-$STAMP.log
RCF=$BENCH_RUN/bench-sh-$STAMP.rc
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
warn "cd $ROOT && BENCH_RUN=$(q "$BENCH_RUN") $CMDLINE"
warn "(log: $LOG; the whole run is bounded to ${TOTAL_TIMEOUT}s)"
# stdout and stderr of peers.sh go to the terminal and to $LOG; its exit status to $RCF
{
  rc=0
  # --foreground: Ctrl-C reaches peers.sh, and on timeout it gets TERM and stops its servers itself
  timeout --foreground -k 30 "$TOTAL_TIMEOUT" bash "$PEERS_SH" "$@" 2>&1 || rc=$?
  echo "$rc" > "$RCF"
} | tee "$LOG"
rc=$(cat "$RCF" 2>/dev/null || echo 1)
[ "$rc" = 0 ] || die "peers.sh failed (exit $rc$([ "$rc" = 124 ] && echo ": timed out after ${TOTAL_TIMEOUT}s")); log: $LOG"

# peers.sh ends with "results: MD (raw: TSV, wrk outputs and server logs in DIR)"
MD=$(sed -n 's/^\[[0-9:]*\] results: \(.*\) (raw: .*, wrk outputs and server logs in .*)$/\1/p' "$LOG" | tail -1)
TSV=$(sed -n 's/^\[[0-9:]*\] results: .* (raw: \(.*\), wrk outputs and server logs in .*)$/\1/p' "$LOG" | tail -1)
if [ -z "$TSV" ] || [ ! -f "$TSV" ]; then die "cannot find peers.sh's results in its output (log: $LOG)"; fi
JSONL=$(dirname "$TSV")/idle-$(basename "$TSV" .tsv | sed 's/^results-//').jsonl

# ------------------------------------------------------------ the summary
OUT=bench/results/latest.md
TMP_OUT=$OUT.tmp.$$
"$PY" - "$TSV" "$JSONL" "$MD" "$DATE" "$OUTER" \
  "$CMDLINE" "$ROUNDS" > "$TMP_OUT" <<'PYEOF' || { rm -f "$TMP_OUT"; die "the summary failed (raw: $TSV)"; }
import csv, json, os, re, statistics, sys
tsv, jsonl, md, date, outer, cmd, rounds = sys.argv[1:8]
rows = list(csv.DictReader(open(tsv), delimiter="\t"))

def med(xs):
    xs = [float(x) for x in xs if x not in ("", "nan")]
    return statistics.median(xs) if xs else float("nan")

def agg(scen, peer):
    rr = [r for r in rows if r["scenario"] == scen and r["peer"] == peer]
    if not rr:
        return None
    return dict(rps=med(r["rps"] for r in rr), p99=med(r["p99_ms"] for r in rr),
                idle=med(r["idle_rss_kb"] for r in rr),
                rounds=" / ".join(f"{float(r['rps']):.0f}" for r in rr),
                err=sum(int(float(r["errors"] or 0)) for r in rr),
                chk=",".join(sorted(set(r["check"] for r in rr))))

def num(v, fmt):
    return "n/a" if v is None or v != v else format(v, fmt)

def ratio(a, b):
    return f"{a / b:.2f}" if a == a and b == b and a > 0 and b > 0 else "n/a"

scens = []
for r in rows:
    if r["scenario"] not in scens:
        scens.append(r["scenario"])
lines, notes = [], []
st = any(r["peer"] == "moonlet-static" for r in rows)
lines.append("| metric | moonlet | nginx-lua | moonlet ÷ nginx-lua |"
             + (" moonlet-static (`make static`) | static ÷ nginx-lua |" if st else ""))
lines.append("|---|---|---|---|" + ("---|---|" if st else ""))
for s in scens:
    m, n, t = agg(s, "moonlet"), agg(s, "nginx-lua"), agg(s, "moonlet-static")
    if m is None:
        continue
    nr = n["rps"] if n else float("nan")
    tail = (lambda a, b: f" {a} | {b} |" if st else "")
    lines.append(f"| {s}: req/s | {num(m['rps'], '.0f')} | {num(nr, '.0f')} | **{ratio(m['rps'], nr)}** |"
                 + tail(num(t['rps'], '.0f') if t else "", f"**{ratio(t['rps'], nr)}**" if t else ""))
    if not s.startswith("pipelined"):      # wrk's latency is per batch when pipelined: peers.sh shows n/a
        lines.append(f"| {s}: p99 ms | {num(m['p99'], '.2f')} | {num(n['p99'] if n else None, '.2f')} | |"
                     + tail(num(t['p99'], '.2f') if t else "", ""))
    a = agg(s, "moonlet-readme")
    if a:
        lines.append(f"| {s}, examples/hello.lua (the README's app, one middleware): req/s "
                     f"| {num(a['rps'], '.0f')} | {num(nr, '.0f')} | **{ratio(a['rps'], nr)}** |"
                     + tail("", ""))
        if not s.startswith("pipelined"):
            lines.append(f"| {s}, examples/hello.lua: p99 ms | {num(a['p99'], '.2f')} "
                         f"| {num(n['p99'] if n else None, '.2f')} | |" + tail("", ""))
        if int(rounds) > 1:
            notes.append(f"{s} req/s by round, examples/hello.lua: {a['rounds']}")
    if s == "hello":
        lines.append(f"| idle RSS before load, MiB | {num(m['idle'] / 1024, '.1f')} "
                     f"| {num(n['idle'] / 1024 if n else None, '.1f')} | |"
                     + tail(num(t['idle'] / 1024, '.1f') if t else "", ""))
    if int(rounds) > 1:
        notes.append(f"{s} req/s by round: moonlet {m['rounds']}" + (f"; nginx-lua {n['rounds']}" if n else "")
                     + (f"; moonlet-static {t['rounds']}" if t else ""))
    for name, a in (("moonlet", m), ("moonlet-static", t)):
        if a and (a["chk"] != "ok" or a["err"]):
            notes.append(f"**{s}: {name} check = {a['chk']}, errors = {a['err']}**")
    if n and (n["chk"] != "ok" or n["err"]):
        notes.append(f"{s}: nginx-lua check = {n['chk']}, errors = {n['err']}")
idle = {}
if os.path.exists(jsonl):
    for l in open(jsonl):
        if l.strip():
            e = json.loads(l)
            idle[e["peer"]] = e["result"]
if "moonlet" in idle:
    m, n, t = idle["moonlet"], idle.get("nginx-lua", {}), idle.get("moonlet-static", {})
    def g(r, k):
        return r.get(k) if isinstance(r, dict) and "error" not in r else None
    for name, r in (("moonlet", m), ("moonlet-static", t)):
        if isinstance(r, dict) and "error" in r:
            notes.append(f"**idle: {name} error: {r['error']}**")
    conns = g(m, "n") or "?"
    for label, k in (("no request", "per_conn_connected_b"), ("after 1 request each", "per_conn_after_req_b")):
        lines.append(f"| idle: bytes per connection ({conns} open, {label}) "
                     f"| {num(g(m, k), '.0f')} | {num(g(n, k), '.0f')} | |"
                     + (f" {num(g(t, k), '.0f')} | |" if st else ""))
    if g(m, "open") is not None and g(m, "open") != g(m, "n"):
        notes.append(f"**idle: moonlet kept {m['open']} of {m['n']} connections open**")

host = ""
if md and os.path.exists(md):
    full = open(md).read()
    first = full.split("\n", 1)[0]
    host = first[len("Run: "):].rstrip(" .") if first.startswith("Run: ") else ""
else:
    full = ""
busy = re.search(r"before/after the run.*?: CPU0 (\d+)%/(\d+)%, CPU1 (\d+)%/(\d+)%", host)
if busy and max(int(x) for x in busy.groups()) > 20:
    notes.append("**Other tenants kept the CPUs busy around the run (CPU0 %s%%/%s%%, CPU1 %s%%/%s%% before/after): "
                 "the numbers are noisy, rerun on a quiet machine before citing them.**" % busy.groups())
print("# moonlet beside nginx+lua (`make bench`)\n")
print(f"Date: {date}.  ")
print(f"Command (from the repo root): `{outer}`, which ran  ")
print(f"`{cmd}`  ")
print(f"Raw results: `{tsv}`" + (f", `{jsonl}`" if os.path.exists(jsonl) else "") + ".\n")
if host:
    print(f"Host: {host}.\n")
print(f"Server on CPU 0, wrk on CPU 1 (2 vCPUs, shared machine: only ratios within one run mean anything); "
      f"median of {rounds} round(s). moonlet serves examples/bench_hello.lua (GET / only, no middleware; "
      f"the rows marked examples/hello.lua serve the README's app: four routes, one middleware); "
      f"in fanout*, examples/fanout.lua. moonlet-static is the same app under build/moonlet-static "
      f"(`make static`: one executable, glibc included).\n")
print("\n".join(lines))
print()
for x in notes:
    print(f"- {x}")
if notes:
    print()
if full:
    print("## Every peer (peers.sh's tables)\n")
    print(full.rstrip())
PYEOF
mv "$TMP_OUT" "$OUT"
echo
echo "================ moonlet summary ================"
sed '/^## Every peer/,$d' "$OUT"
echo "saved to $ROOT/$OUT (with every peer's tables)"
if [ "${BENCH_EQUAL:-1}" != 0 ]; then
  BENCH_PEERS=$PEERS_SH sh scripts/bench_equal_load.sh || warn "the equal-load section failed"
fi
if [ "${BENCH_LOG:-1}" != 0 ]; then
  BENCH_PEERS=$PEERS_SH sh scripts/bench_access_log.sh || warn "the access-log section failed"
fi
if [ "${BENCH_PROXY:-1}" != 0 ]; then
  BENCH_PEERS=$PEERS_SH sh scripts/bench_proxy.sh || warn "the reverse-proxy section failed"
fi
[ "${BENCH_WS:-1}" = 0 ] || ws_bench
[ "${BENCH_DB:-1}" = 0 ] || db_bench
