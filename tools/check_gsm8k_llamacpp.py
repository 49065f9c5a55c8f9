#!/usr/bin/env python3
"""Does llama.cpp, given cotlab's exported LoRA, answer GSM8K problems as cotlab does?

    python3 tools/check_gsm8k_llamacpp.py DETAILS.jsonl BASE.gguf LORA.gguf [--limit N] [--max-new K]

DETAILS is `cotlab eval --details` of the adapted model: each line holds a problem's prompt ids,
cotlab's greedy completion ids and its answer. llama.cpp (llama-cpp-python) decodes the same
prompt ids greedily with the adapter (`lora_path`) on BASE, up to K new tokens, stopping at the
end-of-turn token as cotlab does, and the two are compared: identical completions, and identical
final answers (the number after the last "####", else the last number). On an F32 BASE the two
should agree but for rounding; on the Q4_1 file llama.cpp also quantises the activations to 8
bits, so some completions drift. Prints `RESULT problems=N same_tokens=A same_answer=B`.
Needs llama-cpp-python; the KV cache is F32 (llama.cpp's default F16 cache moves logits ~1e-3).
"""
import argparse
import json
import re
import sys


def final_answer(text):
    m = re.findall(r"####\s*([-$0-9.,/]+)", text)
    nums = m if m else re.findall(r"-?\d[\d,]*\.?\d*", text)
    return nums[-1].replace(",", "").replace("$", "").rstrip(".") if nums else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("details")
    p.add_argument("base")
    p.add_argument("lora")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("UNAVAILABLE llama-cpp-python is not installed")
        return 3
    rows = [json.loads(line) for line in open(a.details)][: a.limit]
    mp = llama_cpp.llama_model_default_params()
    extra = {"use_extra_bufts": False} if hasattr(mp, "use_extra_bufts") else {}   # AMX repacking off
    lm = llama_cpp.Llama(model_path=a.base, lora_path=a.lora, n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                         type_k=0, type_v=0, verbose=False, **extra)
    stop = {lm.token_eos()}
    same_tokens = same_answer = 0
    for r in rows:
        lm.reset()
        out = []
        for tok in lm.generate(r["prompt_ids"], top_k=1, temp=0.0, reset=True):
            if tok in stop or len(out) >= a.max_new:
                break
            out.append(tok)
        text = lm.detokenize(out).decode("utf-8", errors="replace")
        same_tokens += out == r["completion_ids"]
        same_answer += final_answer(text) == final_answer(r["completion"])
    print("RESULT problems=%d same_tokens=%d same_answer=%d llama_cpp=%s" % (len(rows), same_tokens, same_answer, llama_cpp.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
