#!/usr/bin/env python3
"""llama.cpp's generation speed, for build/bench's side-by-side table (needs llama-cpp-python).

    python3 tools/bench_gen.py MODEL.gguf --threads N --tokens K

Greedy decoding of K new tokens after a short prompt, one stream; prints
`RESULT tok_per_s=...` (new tokens over the whole call, prompt included, median of 3 runs).
"""
import argparse
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("UNAVAILABLE llama-cpp-python is not installed")
        return 3
    llm = llama_cpp.Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=512, verbose=False)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]   # a few fixed token ids
    rates = []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        n = 0
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == a.tokens:
                break
        rates.append(n / (time.perf_counter() - t))
    print("RESULT tok_per_s=%.2f llama_cpp=%s" % (statistics.median(rates), llama_cpp.__version__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
