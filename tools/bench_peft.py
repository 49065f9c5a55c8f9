#!/usr/bin/env python3
"""PyTorch + PEFT reference for build/bench, section 6: one LoRA SFT step of SmolLM2-135M.

The model is LlamaForCausalLM with SmolLM2-135M's shape (vocab 49152, C 576, 30 layers, 9 heads,
3 KV heads, FF 1536, tied embeddings), float32, sdpa attention, seeded random weights (speed and
memory do not depend on the values). PEFT LoRA r 16, alpha 32, on q, k, v, o, gate, up, down;
the base frozen. A step: forward on B x T random tokens with labels (mean cross-entropy),
backward, torch.optim.AdamW on the adapter (lr 1e-4), zero_grad. One warm-up step, then the
median of --steps. The last line is machine-readable:

    RESULT threads=2 batch=1 seq=512 steps=3 ms_per_step=... tokens_per_s=... maxrss_mb=...

When torch, transformers or peft cannot be imported it prints "UNAVAILABLE <reason>", exits 3.
"""
import argparse
import resource
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    try:
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        print("UNAVAILABLE", e)
        return 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).float()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, 49152, (args.batch, args.seq))
    times = []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s:
            times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT threads=%d batch=%d seq=%d steps=%d ms_per_step=%.1f tokens_per_s=%.1f maxrss_mb=%.0f"
          % (args.threads, args.batch, args.seq, args.steps, ms, args.batch * args.seq / ms * 1e3, rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
