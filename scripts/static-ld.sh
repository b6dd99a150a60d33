#!/bin/sh
# scripts/static-ld.sh CC > static.ld: the toolchain's own static linker script with the cold
# libraries (OpenSSL, SQLite, zlib, PCRE2) moved behind everything else in .text, .rodata and
# .data.rel.ro. The kernel maps a file's pages in 64 KiB windows around each page touched, so
# an idle server that never calls these libraries must not have them between the hot code of
# moonlet, LuaJIT, libuv and libc: that ordering keeps about 140 KiB out of `make static`'s RSS.
# The archive members listed in scripts/static-hot.txt (what an idle server runs at start, found by
# scripts/static-profile.sh) go first in .text, so that start-up touches a few contiguous
# windows instead of one window in every part of libc: idle RSS 2.9 -> 2.2 MB.
# Used by the Makefile's static link only; the layout changes nothing else.
set -e
cc=${1:-cc}
here=$(dirname "$0")
cold='*libssl.a:* *libcrypto.a:* *libsqlite3.a:* *libz.a:* *libpcre2-8.a:*'
hot=$(grep -v '^#' "$here/static-hot.txt" | sed 's@^\(.*\)$@    *\1(.text .text.*)\\n@' | tr -d '\n')
"$cc" -static -Wl,--verbose -x c /dev/null -o /dev/null 2>/dev/null |
  sed -n '/^=====/,/^=====/p' | sed '1d;$d' |
  sed -e "s@^\( *\)\*(\.text\.unlikely \.text\.\*_unlikely \.text\.unlikely\.\*)@$hot&@" \
      -e "s@^\( *\)\*(\.text \.stub \.text\.\* \.gnu\.linkonce\.t\.\*)@\1*(EXCLUDE_FILE($cold) .text .stub .text.* .gnu.linkonce.t.*)\n\1*(.text .stub .text.* .gnu.linkonce.t.*)@" \
      -e "s@{ \*(\.rodata \.rodata\.\* \.gnu\.linkonce\.r\.\*) }@{ *(EXCLUDE_FILE($cold) .rodata .rodata.* .gnu.linkonce.r.*) *(.rodata .rodata.* .gnu.linkonce.r.*) }@" \
      -e "s@\*(\.data\.rel\.ro \.data\.rel\.ro\.\* \.gnu\.linkonce\.d\.rel\.ro\.\*) }@*(EXCLUDE_FILE($cold) .data.rel.ro .data.rel.ro.* .gnu.linkonce.d.rel.ro.*) *(.data.rel.ro .data.rel.ro.* .gnu.linkonce.d.rel.ro.*) }@"
