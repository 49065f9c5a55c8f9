#!/usr/bin/env bash
# Runs each fuzzer for SECONDS on its corpus (build/fuzz/corpus/NAME, grown run to run), its
# seeds and its committed regression inputs, then prints one line per fuzzer: executions,
# rate, corpus size. A crash, leak, hang (10 s) or sanitizer report stops with the input saved
# as build/fuzz/crash-NAME-*; commit it under tests/fuzz/regress/NAME/ once fixed.
# With FUZZ_RUNS set, each fuzzer stops after that many executions if that comes first.
# Usage: [FUZZ_RUNS=N] tests/fuzz/run.sh SECONDS NAME...
set -uo pipefail
seconds=$1; shift
runs=${FUZZ_RUNS:--1} limit="$seconds s"
[ "$runs" = -1 ] || limit+=" or $runs executions"
cd "$(dirname "$0")/../.."
status=0 summary=""
for name in "$@"; do
  if [ "$name" = tokenizer ] && [ ! -d models/vocab ] && [ ! -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    summary+=$(printf '\n  %-12s skipped: no vocabulary in models/ (make models)' "$name"); continue
  fi
  mkdir -p "build/fuzz/corpus/$name"
  extra=()
  [ -d "tests/fuzz/regress/$name" ] && extra+=("tests/fuzz/regress/$name")
  [ "$name" = cli ] && extra+=(-close_fd_mask=3)   # its usage and error messages
  log=build/fuzz/$name.log
  echo "== fuzz_$name, $limit"
  "build/fuzz/fuzz_$name" -max_total_time="$seconds" -runs="$runs" -timeout=10 -rss_limit_mb=2560 -malloc_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="build/fuzz/crash-$name-" \
    "build/fuzz/corpus/$name" "build/fuzz/seeds/$name" "${extra[@]}" > "$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  files=$(find "build/fuzz/corpus/$name" -type f | wc -l)
  if [ $rc -ne 0 ]; then
    status=1
    grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$log" | head -n 8
    summary+=$(printf '\n  %-12s FAILED (see %s)' "$name" "$log")
  else
    summary+=$(printf '\n  %-12s %12s executions  %8s/s  corpus %5s files' "$name" "${execs:-?}" "${rate:-?}" "$files")
  fi
done
echo "fuzzing, $limit each:$summary"
exit $status
