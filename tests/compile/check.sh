#!/usr/bin/env bash
# The compile matrix: the header as C99 and as C++11 under gcc and clang with warnings as errors;
# declarations alone; two COTLAB_STATIC files linked together; the threads and SIMD switches.
set -u
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fails=0
flags="-Wall -Wextra -Wpedantic -Werror"
run() {   # run DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@" 2>"$out/err"; then echo "  ok    $what"; else echo "  FAIL  $what"; sed 's/^/        /' "$out/err" | head -20; fails=$((fails + 1)); fi
}
for cc in gcc clang g++ clang++; do
  command -v "$cc" >/dev/null 2>&1 || { echo "  skip  $cc (not installed)"; continue; }
  case $cc in *++) lang="-x c++ -std=c++11" ;; *) lang="-std=c99" ;; esac
  run "$cc: implementation" $cc $lang $flags -c tests/test.c -o "$out/t.o"
  run "$cc: declarations only" $cc $lang $flags -c tests/compile/decl_only.c -o "$out/d.o"
  run "$cc: two COTLAB_STATIC files link" $cc $lang $flags tests/compile/static_a.c tests/compile/static_b.c -o "$out/s" -lm -pthread
  run "$cc: two COTLAB_STATIC files run" "$out/s"
  run "$cc: COTLAB_NO_THREADS COTLAB_NO_SIMD" $cc $lang $flags -DCOTLAB_NO_THREADS -DCOTLAB_NO_SIMD -c tests/test.c -o "$out/n.o"
done
[ "$fails" -eq 0 ] && echo "compile matrix: all ok" || echo "compile matrix: $fails failed"
exit $((fails > 0))
