#!/usr/bin/env bash
# The compile matrix: the header as C99 and as C++11 under gcc and clang with warnings as errors;
# declarations alone; two COTLAB_STATIC files linked together; the threads and SIMD switches;
# the implementation with COTLAB_CUDA (cotlab_cuda.cu itself: make cuda, and make test-cuda-emu).
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
  run "$cc: COTLAB_CUDA (the host side of the CUDA backend)" $cc $lang $flags -DCOTLAB_CUDA -c tests/test_cuda.c -o "$out/c.o"
done
# The README's quick start, wrapped in main() with zeroed tokens, must compile and run.
{ echo '#include <stdint.h>'; echo 'static int32_t tokens[8 * 64], targets[8 * 64];'
  awk '/^```c$/{f=1; next} /^```$/{if (f) exit} f && /#define|#include/' README.md
  echo 'int main(void) {'
  awk '/^```c$/{f=1; next} /^```$/{if (f) exit} f && !/#define|#include/' README.md
  echo 'return loss > 0.0f ? 0 : 1; }'; } > "$out/quick.c"
if command -v gcc >/dev/null 2>&1; then
  run "README quick start compiles" gcc -std=c99 $flags -I. "$out/quick.c" -o "$out/quick" -lm -pthread
  run "README quick start runs" "$out/quick"
fi
# And the header's own quick start (prologue lines between QUICK START and the first blank-line gap).
{ echo '#include <stdint.h>'; echo 'static int32_t tokens[8 * 64], targets[8 * 64];'
  echo '#define COTLAB_IMPLEMENTATION'; echo '#include "cotlab.h"'; echo 'int main(void) {'
  awk '/QUICK START/{f=1; next} f && /#include|#define/{next} f && /Every fallible call/{exit} f' cotlab.h
  echo 'return loss > 0.0f ? 0 : 1; }'; } > "$out/quick2.c"
if command -v gcc >/dev/null 2>&1; then
  run "header quick start compiles and runs" sh -c "gcc -std=c99 $flags -I. $out/quick2.c -o $out/quick2 -lm -pthread && $out/quick2"
fi
[ "$fails" -eq 0 ] && echo "compile matrix: all ok" || echo "compile matrix: $fails failed"
exit $((fails > 0))
