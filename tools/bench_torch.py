#!/usr/bin/env python3
"""PyTorch reference for build/bench: one GPT-2-124M training step on the CPU.

The same step as cotlab's benchmark: forward, mean cross-entropy of the logits against random
targets, backward, torch.optim.AdamW (lr 1e-4, weight decay 0, foreach default), zero_grad.
float32, dropout 0, tied LM head. One warm-up step, then the median of --steps steps.

Each attention implementation asked for (eager and sdpa by default) gets a fresh model with the
same seed. The last line of output is machine-readable:

    RESULT threads=2 batch=4 seq=64 steps=5 eager_ms=... sdpa_ms=... best=sdpa ms_per_step=...
           tokens_per_s=... maxrss_mb=...

(one line; ms_per_step is the faster implementation's median, maxrss_mb the process peak RSS).
When torch or transformers cannot be imported it prints "UNAVAILABLE <reason>" and exits with 3.
"""

import argparse
import gc
import resource
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--attn", default="eager,sdpa", help="comma list of eager, sdpa")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def bench_one(torch, impl, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=4 * 768,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=impl,
    )
    model = GPT2LMHeadModel(cfg).float()
    model.train()
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"asked for {impl}, got {model.config._attn_implementation}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    g = torch.Generator().manual_seed(args.seed)
    V, B, T = cfg.vocab_size, args.batch, args.seq
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)

    def step():
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()   # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    del model, opt
    gc.collect()
    return statistics.median(times)


def main():
    args = parse_args()
    try:
        import torch
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or a broken installation
        print(f"UNAVAILABLE cannot import torch and transformers: {e}", flush=True)
        sys.exit(3)

    torch.set_num_threads(args.threads)
    impls = [s.strip() for s in args.attn.split(",") if s.strip()]
    ms = {}
    for impl in impls:
        ms[impl] = bench_one(torch, impl, args)
        print(f"torch {torch.__version__} {impl}: {ms[impl]:.1f} ms/step "
              f"(B={args.batch} T={args.seq}, {args.threads} threads)", file=sys.stderr)
    best = min(ms, key=ms.get)
    fields = [f"threads={args.threads}", f"batch={args.batch}", f"seq={args.seq}",
              f"steps={args.steps}"]
    fields += [f"{k}_ms={v:.3f}" for k, v in ms.items()]
    fields += [f"best={best}", f"ms_per_step={ms[best]:.3f}",
               f"tokens_per_s={args.batch * args.seq / (ms[best] / 1e3):.1f}",
               f"maxrss_mb={maxrss_mb():.1f}"]
    print("RESULT " + " ".join(fields), flush=True)


if __name__ == "__main__":
    main()
