#!/usr/bin/env bash
# The GSM8K recipe (make gsm8k): SmolLM2-135M-Instruct, its Q4_1 base kept quantised, a LoRA
# adapter taught to reason in two stages, each measured on the 768 dev problems:
#   1. the base model, greedy
#   2. LoRA chain-of-thought SFT on GSM8K train (its worked solutions), then greedy
#   3. GRPO from the SFT adapter (math reward + the "#### n" answer-line reward), then greedy
# then each gain with its paired 95% interval (cotlab compare), charts of every stage, the final
# adapter exported for llama.cpp, and (with llama-cpp-python installed) llama.cpp's greedy answers
# with that adapter against cotlab's. Everything goes to --out (runs/gsm8k); results.md holds
# the table.
#
#   tools/gsm8k.sh [--quick] [--out DIR] [--sft-steps N] [--grpo-steps N] [--threads N]
#
# --quick is a smoke run of every stage in a few minutes (16 dev problems, a few steps).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/gsm8k QUICK=0 SFT_STEPS=180 GRPO_STEPS=30 THREADS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --sft-steps) SFT_STEPS=$2; shift ;;
    --grpo-steps) GRPO_STEPS=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    *) echo "gsm8k.sh: unknown option '$1' (--quick, --out DIR, --sft-steps N, --grpo-steps N, --threads N)" >&2; exit 2 ;;
  esac
  shift
done

M=models/SmolLM2-135M-Instruct.Q4_1.gguf
B=build/cotlab
TRAIN=examples/gsm8k/train.jsonl DEV=examples/gsm8k/dev.jsonl
LIMIT=0 MAX_NEW=256 SFT_LEN=512 SFT_BATCH=8 P=8 G=8 CHECK=32
if [ $QUICK = 1 ]; then
  LIMIT=16 MAX_NEW=64 SFT_LEN=256 SFT_BATCH=2 P=2 G=4 CHECK=4
  [ "$SFT_STEPS" = 180 ] && SFT_STEPS=4
  [ "$GRPO_STEPS" = 30 ] && GRPO_STEPS=2
fi
[ -f $M ] || tools/get_smollm2.sh
[ -x $B ] || make --no-print-directory $B
mkdir -p "$OUT"
COMMON=(--model $M --threads $THREADS)
EVAL=(eval "${COMMON[@]}" --data $DEV --format gsm8k --max-new $MAX_NEW --limit $LIMIT --streams 64)
start=$(date +%s)
stage() { echo; echo "== $* ($(($(date +%s) - start)) s in)"; }
# The last value of a field in a file of JSON lines.
field() { sed -n "s/.*\"$2\": \([-0-9.e+naif]*\).*/\1/p" "$1" | tail -n 1; }

stage "1/3 the base model, greedy on dev"
$B "${EVAL[@]}" --details "$OUT/base.jsonl" | tee "$OUT/base.json"

stage "2/3 LoRA chain-of-thought SFT on GSM8K train ($SFT_STEPS steps), then greedy on dev"
rm -rf "$OUT/sft"
$B sft "${COMMON[@]}" --data $TRAIN --format gsm8k --rank 16 --alpha 32 --lr 2e-4 --warmup 10 --min-lr-ratio 0.1 \
  --batch $SFT_BATCH --seq-len $SFT_LEN --packing --steps $SFT_STEPS --save-every 50 --out "$OUT/sft" | tee "$OUT/sft_train.json"
$B "${EVAL[@]}" --load "$OUT/sft/adapter.gguf" --details "$OUT/sft.jsonl" | tee "$OUT/sft.json"

stage "3/3 GRPO from the SFT adapter ($GRPO_STEPS steps of $P prompts x $G samples), then greedy on dev"
rm -rf "$OUT/grpo"
$B grpo "${COMMON[@]}" --data $TRAIN --format gsm8k --init-adapter "$OUT/sft/adapter.gguf" --prompts $P --group $G --batch 8 \
  --max-new $MAX_NEW --seq-len $((MAX_NEW + 256)) --reward math,answer_line:0.2 --loss dapo --beta 0.02 --lr 2e-5 \
  --steps $GRPO_STEPS --save-every 10 --out "$OUT/grpo" | tee "$OUT/grpo_train.json"
$B "${EVAL[@]}" --load "$OUT/grpo/adapter.gguf" --details "$OUT/grpo.jsonl" | tee "$OUT/grpo.json"

stage "results"
$B compare "$OUT/base.jsonl" "$OUT/sft.jsonl" > "$OUT/sft_vs_base.json"
$B compare "$OUT/sft.jsonl" "$OUT/grpo.jsonl" > "$OUT/grpo_vs_sft.json"
# Accuracy by stage as a metrics file, for the chart.
{
  for s in base sft grpo; do
    printf '{"step": %d, "accuracy": %s, "mean_length": %s}\n' $([ $s = base ] && echo 0 || ([ $s = sft ] && echo 1 || echo 2)) \
      "$(field "$OUT/$s.json" greedy_accuracy)" "$(field "$OUT/$s.json" mean_length)"
  done
} > "$OUT/stages.jsonl"
$B plot "$OUT/stages.jsonl" --keys accuracy,mean_length -o "$OUT/accuracy_by_stage.svg"
$B plot "$OUT/sft/metrics.jsonl" --keys loss,lr -o "$OUT/sft.svg"
$B plot "$OUT/grpo/metrics.jsonl" --keys reward,rewards/math/mean,kl,completions/mean_length -o "$OUT/grpo.svg"
pct() { awk -v x="$1" 'BEGIN { printf "%.1f%%", 100 * x }'; }
row() {   # stage, accuracy file, comparison file (or -), training summary (or -)
  local acc lo hi gain=- tps=- secs peak
  acc=$(field "$2" greedy_accuracy)
  if [ "$3" != - ]; then
    lo=$(field "$3" b_lo) hi=$(field "$3" b_hi)
    gain="$(pct "$(field "$3" diff)") [$(pct "$(field "$3" diff_lo)"), $(pct "$(field "$3" diff_hi)")], McNemar p $(field "$3" mcnemar_p)"
  else   # the base: its interval from the first comparison
    lo=$(field "$OUT/sft_vs_base.json" a_lo) hi=$(field "$OUT/sft_vs_base.json" a_hi)
  fi
  secs=$(field "$2" seconds) peak=$(field "$2" peak_mb)
  if [ "$4" != - ]; then
    tps="train $(field "$4" tokens_per_s) tok/s, eval $(field "$2" tokens_per_s)"
    secs=$(awk -v a="$(field "$4" seconds)" -v b="$secs" 'BEGIN { print a + b }')
    peak=$(awk -v a="$(field "$4" peak_mb)" -v b="$peak" 'BEGIN { print (a > b ? a : b) }')
  else
    tps="eval $(field "$2" tokens_per_s)"
  fi
  printf '| %s | %s [%s, %s] | %s | %s | %.0f s | %.0f MB |\n' "$1" "$(pct "$acc")" "$(pct "$lo")" "$(pct "$hi")" "$gain" "$tps" "$secs" "$peak"
}
{
  echo "GSM8K dev ($(field "$OUT/base.json" problems) problems), greedy, up to $MAX_NEW new tokens; SmolLM2-135M-Instruct Q4_1 + LoRA r 16"
  echo
  echo "| stage | accuracy [95% CI] | gain over the stage before [paired 95% CI] | tokens/s | wall time | peak memory |"
  echo "|---|---|---|---|---|---|"
  row "base" "$OUT/base.json" - -
  row "+ LoRA SFT ($SFT_STEPS steps)" "$OUT/sft.json" "$OUT/sft_vs_base.json" "$OUT/sft_train.json"
  row "+ GRPO ($GRPO_STEPS steps)" "$OUT/grpo.json" "$OUT/grpo_vs_sft.json" "$OUT/grpo_train.json"
  echo
  echo "charts: $OUT/accuracy_by_stage.svg, $OUT/sft.svg, $OUT/grpo.svg; the whole recipe: $(($(date +%s) - start)) s"
} | tee "$OUT/results.md"

stage "the adapter for llama.cpp"
$B export "${COMMON[@]}" --load "$OUT/grpo/adapter.gguf" --to llamacpp --out "$OUT/grpo-lora.gguf"
if python3 -c "import llama_cpp" 2>/dev/null; then
  $B export "${COMMON[@]}" --to merged --out "$OUT/base-f32.gguf"
  f32=$(python3 tools/check_gsm8k_llamacpp.py "$OUT/grpo.jsonl" "$OUT/base-f32.gguf" "$OUT/grpo-lora.gguf" --limit $CHECK --max-new $MAX_NEW | grep RESULT || true)
  q41=$(python3 tools/check_gsm8k_llamacpp.py "$OUT/grpo.jsonl" $M "$OUT/grpo-lora.gguf" --limit $CHECK --max-new $MAX_NEW | grep RESULT || true)
  {
    echo
    echo "llama.cpp with the exported adapter, greedy, first $CHECK dev problems, against cotlab's completions:"
    echo "- on an F32 export of the base: ${f32#RESULT }"
    echo "- on the Q4_1 file (llama.cpp quantises activations there too): ${q41#RESULT }"
  } | tee -a "$OUT/results.md"
  rm -f "$OUT/base-f32.gguf"
else
  echo "llama-cpp-python is not installed: the llama.cpp check was skipped (pip install llama-cpp-python)" | tee -a "$OUT/results.md"
fi
echo "wrote $OUT/results.md ($(($(date +%s) - start)) s)"
