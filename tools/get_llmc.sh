#!/bin/sh
# Puts karpathy/llm.c's sources in models/llm.c/ (git-ignored), so that tools/bench_llmc.c can
# time llm.c's own CPU GPT-2 training step next to ours. Only `make bench` needs it; nothing of
# llm.c is copied into this repository. LLMC_MIRROR=/path/to/llm.c.git uses a local bare git
# directory instead of cloning from GitHub.
set -e
cd "$(dirname "$0")/.."
dir=models/llm.c
if [ -f "$dir/train_gpt2.c" ]; then
    echo "$dir is already there"
    exit 0
fi
mkdir -p models
if [ -n "$LLMC_MIRROR" ]; then
    mkdir -p "$dir"
    git --git-dir="$LLMC_MIRROR" archive HEAD | tar -x -C "$dir"
else
    git clone --depth 1 https://github.com/karpathy/llm.c "$dir"
fi
[ -f "$dir/train_gpt2.c" ] || { echo "no $dir/train_gpt2.c after fetching" >&2; exit 1; }
