#!/usr/bin/env python3
"""llama.cpp's batched generation speed: N sequences decoded together (needs llama-cpp-python).

    python3 tools/bench_gen_batch.py MODEL.gguf --threads T --streams N --tokens K [--prompt-len P] [--shared]

Uses llama-cpp-python's low-level API, as a user's batched sampler would: each stream gets P
token ids drawn by random.Random(stream index) from 100..20000 (with --shared, by the group
index: groups of 8 streams share one prompt, evaluated once for the group's first sequence and
copied to the others with llama_memory_seq_cp, as P prompts x G samples in GRPO would). The
prefill packs the prompts into llama_batches of up to n_batch tokens, logits only at each
prompt's last token; its argmax is each stream's first new token. The decode phase then runs K
steps, each one llama_decode of N tokens (one per stream, the previous step's argmax) followed
by the argmax of each stream's logits, ignoring EOS, so the work is fixed: N*K tokens.
Prints `RESULT streams=N tokens=K decode_tok_per_s=... prefill_tok_per_s=... total_s=...`:
N*K over the decode seconds, prompt tokens evaluated over the prefill seconds, and prefill plus
decode; medians of 3 runs, each on a cleared KV cache.
--check instead decodes 2 streams on one shared prompt and compares their greedy tokens with
each other and with the high-level Llama.generate (exit 1 if they differ).
"""
import argparse
import random
import statistics
import sys
import time

GROUP = 8   # streams per shared prompt with --shared
QUIET = None


def prompts_for(a):
    key = (lambda s: s // GROUP) if a.shared else (lambda s: s)
    return [[random.Random(key(s)).randrange(100, 20001) for _ in range(a.prompt_len)] for s in range(a.streams)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--shared", action="store_true", help="groups of 8 streams share one prompt (seq_cp)")
    p.add_argument("--kv-unified", action="store_true", help="one KV buffer for all sequences (default: one per sequence)")
    p.add_argument("--extra-bufts", action="store_true", help="allow weight repacking (off by default: AMX repacking can crash)")
    p.add_argument("--check", action="store_true", help="check 2 streams on one prompt against Llama.generate")
    a = p.parse_args()
    try:
        import numpy as np
        import llama_cpp as L
    except ImportError as e:
        print("UNAVAILABLE %s" % e)
        return 3
    if not hasattr(L, "llama_batch_init"):
        print("UNAVAILABLE llama-cpp-python %s has no low-level batch API" % L.__version__)
        return 3
    if a.check:
        a.streams, a.tokens, a.shared = 2, 8, True
    N, K, P = a.streams, a.tokens, a.prompt_len

    global QUIET   # module-level: llama.cpp keeps calling this pointer until exit
    QUIET = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(QUIET, None)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    if "use_extra_bufts" in [f[0] for f in mp._fields_]:
        mp.use_extra_bufts = a.extra_bufts
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    if not model:
        print("UNAVAILABLE could not load %s" % a.model)
        return 3
    prompts = prompts_for(a)
    # Streams that evaluate their own prompt; with --shared the others get a copy of their leader's KV.
    leaders = [s for s in range(N) if not a.shared or s % GROUP == 0]
    n_prefill = len(leaders) * P
    cp = L.llama_context_default_params()
    cp.n_ctx = N * (P + K)            # enough even for a unified KV cache holding every sequence
    cp.n_seq_max = N
    cp.n_batch = max(N, min(n_prefill, 8192))
    cp.n_ubatch = min(512, cp.n_batch)
    cp.n_threads = cp.n_threads_batch = a.threads
    if hasattr(cp, "kv_unified"):
        cp.kv_unified = a.kv_unified
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        print("UNAVAILABLE could not create a context with n_ctx=%d n_seq_max=%d" % (cp.n_ctx, N))
        return 3
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    if hasattr(L, "llama_get_memory"):      # 0.3.10+: llama_memory_*; before: llama_kv_self_*
        mem = L.llama_get_memory(ctx)
        clear, seq_cp = (lambda: L.llama_memory_clear(mem, True)), (lambda s, d: L.llama_memory_seq_cp(mem, s, d, -1, -1))
    else:
        clear, seq_cp = (lambda: L.llama_kv_self_clear(ctx)), (lambda s, d: L.llama_kv_self_seq_cp(ctx, s, d, -1, -1))
    batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def decode(items):   # items: (token, pos, seq, want_logits); returns the batch rows with logits
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError("llama_decode returned %d" % rc)

    def argmax(row):
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,))))

    def run():
        clear()
        t0 = time.perf_counter()
        items = [(tok, i, s, i == P - 1) for s in leaders for i, tok in enumerate(prompts[s])]
        first = {}
        for c in range(0, len(items), cp.n_batch):
            chunk = items[c:c + cp.n_batch]
            decode(chunk)
            first.update({seq: argmax(r) for r, (_, _, seq, out) in enumerate(chunk) if out})
        for s in range(N):
            if s not in first:          # a follower: share its leader's prompt cells and first token
                seq_cp(s - s % GROUP, s)
                first[s] = first[s - s % GROUP]
        t1 = time.perf_counter()
        last, out = [first[s] for s in range(N)], [[first[s]] for s in range(N)]
        for k in range(K):
            decode([(last[s], P + k, s, True) for s in range(N)])
            last = [argmax(s) for s in range(N)]
            for s in range(N):
                out[s].append(last[s])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    if a.check:
        _, _, out = run()
        llm = L.Llama(model_path=a.model, n_threads=a.threads, n_ctx=P + K + 8, verbose=False)
        ref = []
        for tok in llm.generate(prompts[0], top_k=1, temp=0.0, reset=True):
            ref.append(tok)
            if len(ref) == K + 1:
                break
        ok = out[0] == out[1] == ref
        print("CHECK %s stream0=%s stream1=%s Llama.generate=%s" % ("ok" if ok else "FAIL", out[0], out[1], ref))
        return 0 if ok else 1
    runs = [run() for _ in range(3)]
    pre, dec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    total = statistics.median(r[0] + r[1] for r in runs)
    print("RESULT streams=%d tokens=%d decode_tok_per_s=%.2f prefill_tok_per_s=%.2f total_s=%.3f llama_cpp=%s"
          % (N, K, N * K / dec, n_prefill / pre, total, L.__version__))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
