#!/bin/bash
# scripts/static-profile.sh [ROUNDS]: regenerates scripts/static-hot.txt, the archive members that
# `make static` places first in .text (see scripts/static-ld.sh). A developer tool, not part of the
# build: it needs perf and root. Each round links build/moonlet-static and
# build/examples/iot_device-static, drops them from the page cache, runs each (the CLI serving
# examples/bench_hello.lua) under `perf record -e page-faults` for 2 s, and adds the archive
# member of every function that took a page fault. Faults are counted per
# 64 KiB window (the kernel's fault-around), so a round only sees the first touch of each window:
# repeat until the list stops growing. Finally every CPU variant of a hot string function
# (memchr-evex.o -> memchr-*.o) is added, so a machine that picks AVX2 over EVEX gains as much.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-12}
hot=scripts/static-hot.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# symbol -> archive:member for every archive of the static link
for a in $(make -s -f Makefile print-static-archives) $(cc -print-file-name=libc.a) \
         /usr/lib/x86_64-linux-gnu/libm-2.*.a; do
  nm -A "$a" 2>/dev/null | awk -v A="$(basename "$a")" '$2 ~ /^[TtiW]$/ { split($1, p, ":"); print $3, A ":" p[2] }'
done > "$tmp/syms"
[ -f "$hot" ] || : > "$hot"
for r in $(seq 1 "$rounds"); do
  rm -f build/moonlet-static build/examples/iot_device-static build/static.ld
  make -s build/moonlet-static build/examples/iot_device-static STATIC_NOSTRIP=1 >/dev/null
  : > "$tmp/faulted"
  for cmd in "build/moonlet-static examples/bench_hello.lua --port 18190 --log-level warn" \
             "build/examples/iot_device-static --port 18191"; do
    bin=${cmd%% *}
    sync "$bin" && dd if="$bin" iflag=nocache count=0 status=none
    perf record -q -e page-faults -c 1 -o "$tmp/pf.data" -- timeout 2 $cmd >/dev/null 2>&1 || true
    perf script -i "$tmp/pf.data" -F ip,sym 2>/dev/null | awk '{ print $2 }' >> "$tmp/faulted"
  done
  sort -u -o "$tmp/faulted" "$tmp/faulted"
  before=$(grep -cv '^#' "$hot" || true)
  /usr/bin/python3 - "$tmp/syms" "$tmp/faulted" "$hot" <<'PY'
import sys
syms, faulted, hot = sys.argv[1:]
where = {}
for line in open(syms):
    s, o = line.split()
    where.setdefault(s, o)
lines = open(hot).read().splitlines()
have = {l for l in lines if l and not l.startswith('#')}
for s in open(faulted).read().split():
    o = where.get(s)
    if o and o not in have:
        have.add(o); lines.append(o)
open(hot, 'w').write('\n'.join(lines) + '\n')
PY
  after=$(grep -cv '^#' "$hot" || true)
  echo "round $r: $after members (+$((after - before)))"
  [ "$after" != "$before" ] || break
done
# every CPU variant of a hot multiarch string function
/usr/bin/python3 - "$tmp/syms" "$hot" <<'PY'
import re, sys
syms, hot = sys.argv[1:]
members = sorted({l.split()[1] for l in open(syms)})
lines = open(hot).read().splitlines()
have = set(lines)
for l in list(lines):
    m = re.match(r'(libc\.a:[a-z_]+)-(sse2|sse4|ssse3|avx|avx2|avx512|evex)', l)
    if not m: continue
    for o in members:
        if o.startswith(m.group(1) + '-') and o not in have:
            have.add(o); lines.append(o)
open(hot, 'w').write('\n'.join(lines) + '\n')
PY
echo "$(grep -cv '^#' "$hot") members in $hot"
