#!/bin/sh
# spec/run.sh: what `make test` runs: the C tests of spec/c (built against the same objects), then
# every busted spec inside moonlet's runtime, then one closing line with the totals:
#   tests: N passed, M failed
# BUILD (build or build-asan) names the build directory; SANITIZE=1 runs under ASan+UBSan.
set -u
BUILD=${BUILD:-build}
export MOONLET_BIN="$BUILD/moonlet"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:exitcode=23}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export LSAN_OPTIONS="${LSAN_OPTIONS:-suppressions=$(pwd)/spec/lsan.supp:print_suppressions=0}"
passed=0
failed=0
log=$(mktemp)

count() { # count LOGFILE: adds the last "tests: N passed, M failed" line of LOGFILE to the totals
  line=$(grep -E '^(c)?tests: [0-9]+ passed, [0-9]+ failed' "$1" | tail -n 1)
  if [ -z "$line" ]; then
    echo "run.sh: no result line from $2: counted as 1 failure" >&2
    failed=$((failed + 1))
    return
  fi
  p=$(echo "$line" | sed -E 's/^c?tests: ([0-9]+) passed.*/\1/')
  f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
  passed=$((passed + p))
  failed=$((failed + f))
}

for t in "$BUILD"/spec/c/test_*; do
  [ -x "$t" ] || continue
  echo "== $t"
  "$t" >"$log" 2>&1
  rc=$?
  cat "$log"
  count "$log" "$t"
  if [ $rc -ne 0 ] && ! grep -qE '^ctests: [0-9]+ passed, [1-9]' "$log"; then
    echo "run.sh: $t exited with $rc" >&2
    failed=$((failed + 1))
  fi
done

echo "== busted specs ($MOONLET_BIN test spec)"
rcfile=$(mktemp)
{ "$MOONLET_BIN" test spec 2>&1; echo $? >"$rcfile"; } | tee "$log"
rc=$(cat "$rcfile")
rm -f "$rcfile"
count "$log" "busted"
if [ "$rc" -ne 0 ] && ! grep -qE '^tests: [0-9]+ passed, [1-9]' "$log"; then
  echo "run.sh: moonlet test exited with $rc after its specs (a crash at exit?)" >&2
  failed=$((failed + 1))
fi
if grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$log"; then
  echo "run.sh: the sanitizer reported errors above" >&2
  failed=$((failed + 1))
fi
rm -f "$log"
echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
