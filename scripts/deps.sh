#!/bin/sh
# scripts/deps.sh [build|test]: checks the Debian packages moonlet needs and installs the missing
# ones with apt-get when run as root (else prints the apt-get line and fails). `build` (the default,
# what `make` and `make run` use) is what building and serving need; `test` (what `make test` uses)
# adds the servers and peers the specs drive: PostgreSQL, Redis, memcached, Debian's lua-resty
# drivers, Node's ws, Python's websockets, Chromium.
# LuaJIT comes as luajit2 (OpenResty's LuaJIT 2.1 branch): Debian's nginx Lua module needs it and it
# conflicts with the plain libluajit-5.1 package, so one LuaJIT serves both moonlet and its rival.
# lua-cjson-dev is there for its static archive, which `make static` links in.
# libpcre2-dev is PCRE2 (8-bit), OpenResty's regex library, under moonlet.ngx's ngx.re; its static
# archive goes into `make static` too.
set -u
PROFILE=${1:-build}
PKGS="gcc make pkg-config libluajit2-5.1-dev luajit2 libuv1-dev node-llhttp lua-busted lua-cjson
      lua-cjson-dev lua-check libssl-dev openssl zlib1g-dev libsqlite3-dev libpq-dev libpcre2-dev
      curl procps util-linux"
peers() { :; }
if [ "$PROFILE" = test ]; then
  # database servers the specs start privately, and sqlite3 for inspecting test databases
  PKGS="$PKGS sqlite3 postgresql redis-server"
  # Debian's lua-resty drivers (modules nginx.redis, nginx.redis.connector, nginx.memcached,
  # nginx.websocket.*, nginx.dns.resolver, resty.lrucache), run unmodified by spec/ngx_spec.lua and
  # spec/ngx_drivers_spec.lua, and the memcached server the memcached driver talks to
  PKGS="$PKGS lua-nginx-redis lua-nginx-redis-connector lua-nginx-memcached lua-nginx-websocket"
  PKGS="$PKGS lua-nginx-dns"
  PKGS="$PKGS lua-resty-lrucache memcached"
  # WebSocket peers and the chat's browser test (spec/peers): Python's websockets, Debian's
  # chromium, and node + npm unless a node is already on PATH (NodeSource's nodejs bundles npm)
  PKGS="$PKGS python3-websockets chromium"
  command -v node >/dev/null 2>&1 || PKGS="$PKGS nodejs"
  command -v npm >/dev/null 2>&1 || PKGS="$PKGS npm"
  # Node's ws and playwright-core for spec/peers, from npm (spec/peers/package.json)
  peers() {
    dir="$(dirname "$0")/../spec/peers"
    [ -d "$dir/node_modules/ws" ] && [ -d "$dir/node_modules/playwright-core" ] && return 0
    command -v npm >/dev/null 2>&1 || return 0
    npm install --prefix "$dir" --no-audit --no-fund >&2 ||
      echo "deps.sh: npm install --prefix spec/peers failed: the peer tests will be pending" >&2
  }
fi
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# libluajit-5.1-dev (the plain LuaJIT) is as good for building: accept it when it is there.
case "$missing" in
  *libluajit2-5.1-dev*)
    if pkg-config --exists luajit 2>/dev/null; then
      missing=$(echo "$missing" | sed 's/ libluajit2-5.1-dev//; s/ luajit2//')
    fi ;;
esac
[ -z "$missing" ] && { peers; exit 0; }
if [ "$(id -u)" != 0 ]; then
  echo "moonlet needs these Debian packages:$missing" >&2
  echo "install them with: sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends $missing >&2 ||
  { apt-get update >&2 && apt-get install -y --no-install-recommends $missing >&2; } || {
    echo "apt-get install failed" >&2; exit 1; }
peers
