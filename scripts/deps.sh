#!/bin/sh
# scripts/deps.sh: checks the Debian packages moonlet builds, tests and benchmarks with, and installs
# the missing ones with apt-get when run as root (else prints the apt-get line and fails).
# LuaJIT comes as luajit2 (OpenResty's LuaJIT 2.1 branch): Debian's nginx Lua module needs it and it
# conflicts with the plain libluajit-5.1 package, so one LuaJIT serves both moonlet and its rival.
set -u
PKGS="gcc make pkg-config libluajit2-5.1-dev luajit2 libuv1-dev node-llhttp lua-busted lua-cjson
      lua-check libssl-dev openssl zlib1g-dev curl procps util-linux
      libsqlite3-dev sqlite3 libpq-dev postgresql redis-server"
# WebSocket peers and the chat's browser test (spec/peers): Python's websockets, Debian's chromium,
# and node + npm unless a node is already on PATH (NodeSource's nodejs bundles npm)
PKGS="$PKGS python3-websockets chromium"
command -v node >/dev/null 2>&1 || PKGS="$PKGS nodejs"
command -v npm >/dev/null 2>&1 || PKGS="$PKGS npm"
# Node's ws and playwright-core for spec/peers, from npm (spec/peers/package.json), when npm is there
peers() {
  command -v npm >/dev/null 2>&1 || return 0
  npm install --prefix "$(dirname "$0")/../spec/peers" --no-audit --no-fund >&2 ||
    echo "deps.sh: npm install --prefix spec/peers failed: the peer tests will be pending" >&2
}
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
