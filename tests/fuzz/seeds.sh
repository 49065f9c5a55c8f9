#!/usr/bin/env bash
# The fuzzers' seed corpora, from real files: the small models and adapter files make_seeds
# writes, the GGUF, safetensors and PEFT fixtures, GSM8K lines from examples/gsm8k, llama.cpp's
# tokenizer test texts (models/vocab), and command lines from the README. Usage: seeds.sh MAKE_SEEDS OUT
set -euo pipefail
make_seeds=$1 out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
gsm=$root/examples/gsm8k
rm -rf "$out"
for h in gguf safetensors peft_config dataset tokenizer chat cli adapter; do mkdir -p "$out/$h"; done

"$make_seeds" "$out/gguf" "$out/adapter"
cp "$root"/tests/fixtures/gguf/*.gguf "$out/gguf/"

for f in "$root"/tests/fixtures/st/*/model.safetensors "$root"/tests/fixtures/peft/*/adapter_model.safetensors; do
  cp "$f" "$out/safetensors/$(basename "$(dirname "$f")")_$(basename "$f")"
done
cp "$root"/tests/fixtures/st/sample.safetensors "$out/safetensors/"
for d in "$root"/tests/fixtures/peft/*/; do cp "$d/adapter_config.json" "$out/peft_config/$(basename "$d").json"; done

# Datasets: a format byte (0 auto, 1 text, 2 prompt-completion, 3 messages, 4 preference,
# 5 prompt, 6 gsm8k; +8 skip_bad), then JSONL.
ds() { { printf "\\x$(printf %02x "$1")"; cat; } > "$out/dataset/$2"; }
if [ -f "$gsm/train.jsonl" ]; then
  head -n 3 "$gsm/train.jsonl" | ds 0 gsm8k_auto
  head -n 2 "$gsm/dev.jsonl" | ds 6 gsm8k
  sed -n '100,101p' "$gsm/train.jsonl" | ds 14 gsm8k_skip
fi
printf '{"text": "The sum of 3 and 4 is 7."}\n{"text": "caf\\u00e9 \\ud83d\\ude00"}\n' | ds 1 text
printf '{"prompt": "What is 2+2?", "completion": " 4"}\n\n{"prompt": "x", "completion": "y", "answer": "7"}\r\n' | ds 2 prompt_completion
printf '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}\n' | ds 3 messages
printf '{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}\n{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}\n' | ds 4 preference
printf '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]}\n' | ds 4 preference_chat
printf '{"prompt": "Solve 12*3.", "answer": "36", "level": 2, "tags": ["math", null, true]}\n' | ds 5 prompt
printf '{"prompt": "a"}\n{"bad json\n{"prompt": 5}\n' | ds 13 prompt_skip_bad

# Tokenizer: a mode byte (vocabulary in bits 0-1, ids in bit 2, parse_special in bit 3), then text.
tk() { { printf "\\x$(printf %02x "$1")"; cat; } > "$out/tokenizer/$2"; }
for v in 0 1 2 3; do
  printf 'Hello world! 1234567 tokens, caf\xc3\xa9 \xf0\x9f\x98\x80 \xff\xfe broken\n\t  spaces' | tk "$v" text_$v
  printf '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n' | tk $((v + 8)) special_$v
  printf '\x00\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\xff\x10\x27\x00\x00\x00\x00\x00\x80' | tk $((v + 4)) ids_$v
done
if [ -f "$gsm/train.jsonl" ]; then head -n 2 "$gsm/train.jsonl" | tk 1 gsm8k_lines; fi
for f in "$root"/models/vocab/*.inp; do [ -f "$f" ] && tk 2 < "$f" "llamacpp_$(basename "$f" .gguf.inp)"; done

# Chat: byte 0 (bit 0 generation prompt, bit 1 template from the input, bit 2 default system,
# bit 3 Llama-3), byte 1 a BOS id, then 0x01-separated [template,] role, content, ...
ch() { { printf "\\x$(printf %02x "$1")\\x$2"; cat; } > "$out/chat/$3"; }
printf 'system\x01Be brief.\x01user\x01What is 2+2?\x01assistant\x01  4  ' | ch 1 00 chatml
printf 'user\x01hi\x01assistant\x01hello' | ch 5 00 chatml_default_system
printf 'user\x01 hi \x01assistant\x01hello\n' | ch 9 00 llama3
printf "{{ bos_token }}{%% for m in messages %%}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{%% endfor %%}\\x01user\\x01hi" | ch 3 00 template_llama3
printf "{%% if messages[0]['role'] != 'system' %%}{{ '<|im_start|>system\\\\nYou are helpful.<|im_end|>\\\\n' }}{%% endif %%}<|im_start|>\\x01user\\x01hi" | ch 3 02 template_smollm2

# Command lines, NUL-separated.
cl() { local name=$1; shift; printf '%s\0' "$@" | head -c -1 > "$out/cli/$name"; }
cl sft sft --model models/m.gguf --data examples/gsm8k/train.jsonl --format gsm8k --steps 20 --rank 8 --targets q,v,down
cl dpo dpo --model m.gguf --data p.jsonl --loss ipo --beta 0.1 --label-smoothing 0.05 --lr 5e-5
cl grpo grpo --model m.gguf --data d.jsonl --reward math:1,format:0.2,length:0.1 --group 4 --max-new 64 --temperature 0.7
cl rft rft --model m.gguf --data d.jsonl --rounds 2 --samples 4 --limit 10
cl generate generate --model m.gguf --prompt "2+2=" --greedy --max-new 8 --top-k 40 --top-p 0.9
cl eval eval --model m.gguf --data d.jsonl --samples 4 --k 2 --batch 8
cl export export --model m.gguf --load a.gguf --to peft --out dir
cl plot plot runs/out/metrics.jsonl -o x.svg --keys loss,reward
cl help sft --help
