#!/usr/bin/env python3
"""PyTorch's side of make bench-cuda: the same work on the same GPU, eager mode, fp32.

    python3 tools/bench_cuda_torch.py train --B 8 --T 1024 --C 768 --NH 12 --FF 3072 --V 50257 --params 124439808
    python3 tools/bench_cuda_torch.py generate --batch 64 --prompt 32 --new 64 [--quick]
    python3 tools/bench_cuda_torch.py step --model gpt2|smollm2-lora --B 8 --T 1024 [--quick]

train: each kernel's forward and backward as autograd runs them (linear layers, causal
scaled_dot_product_attention, layer_norm, tanh GELU, the LM head with cross-entropy over
materialised logits) and torch.optim.AdamW.step over `params` values. generate: a randomly
initialised SmolLM2-135M-shaped LlamaForCausalLM (transformers), greedy model.generate.
step: one training step of a transformers model (GPT2LMHeadModel, every parameter training; or
the SmolLM2-shaped llama with PEFT LoRA r=16, alpha 32, on every block layer): forward with
the cross-entropy, backward, gradient clipping, torch.optim.AdamW.step, zero_grad.
Prints `TIME name seconds` (medians after a warm-up), `TORCH version`, or `UNAVAILABLE why`.
"""
import argparse
import statistics
import sys
import time


DEV = "cuda"


def median_time(fn, reps, torch):
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def train(a, torch):
    F = torch.nn.functional
    dev = DEV
    N, C = a.B * a.T, a.C
    HS = C // a.NH

    def linear(i, o):
        x = torch.randn(N, i, device=dev, requires_grad=True)
        w = (0.02 * torch.randn(o, i, device=dev)).requires_grad_()
        dy = torch.randn(N, o, device=dev)
        return lambda: F.linear(x, w).backward(dy)

    for name, (i, o) in (("qkv", (C, 3 * C)), ("fc", (C, a.FF)), ("proj", (a.FF, C))):
        print("TIME %s %.9f" % (name, median_time(linear(i, o), a.reps, torch)))

    qkv = torch.randn(a.B, a.T, 3, a.NH, HS, device=dev)
    q, k, v = (qkv[:, :, j].transpose(1, 2).contiguous().requires_grad_() for j in range(3))
    dout = torch.randn(a.B, a.NH, a.T, HS, device=dev)
    att = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
    print("TIME attention %.9f" % median_time(att, a.reps, torch))

    x = torch.randn(N, C, device=dev, requires_grad=True)
    lw = torch.ones(C, device=dev, requires_grad=True)
    lb = torch.zeros(C, device=dev, requires_grad=True)
    dy = torch.randn(N, C, device=dev)
    print("TIME layernorm %.9f" % median_time(lambda: F.layer_norm(x, (C,), lw, lb).backward(dy), a.reps, torch))

    h = torch.randn(N, a.FF, device=dev, requires_grad=True)
    dh = torch.randn(N, a.FF, device=dev)
    print("TIME gelu %.9f" % median_time(lambda: F.gelu(h, approximate="tanh").backward(dh), a.reps, torch))

    hw = (0.02 * torch.randn(a.V, C, device=dev)).requires_grad_()
    tgt = torch.randint(0, a.V, (N,), device=dev)
    head = lambda: F.cross_entropy(F.linear(x, hw), tgt).backward()
    print("TIME head %.9f" % median_time(head, a.reps, torch))

    del q, k, v, qkv, dout, h, dh, hw
    p = (0.02 * torch.randn(a.params, device=dev)).requires_grad_()
    p.grad = 1e-3 * torch.randn(a.params, device=dev)
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    print("TIME adamw %.9f" % median_time(opt.step, a.reps, torch))


def generate(a, torch):
    try:
        import transformers
    except ImportError:
        print("UNAVAILABLE transformers is not installed")
        return
    cfg = transformers.LlamaConfig(
        vocab_size=512 if a.quick else 49152, hidden_size=64 if a.quick else 576, intermediate_size=96 if a.quick else 1536,
        num_hidden_layers=2 if a.quick else 30, num_attention_heads=4 if a.quick else 9, num_key_value_heads=2 if a.quick else 3,
        head_dim=16 if a.quick else 64, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt), device=DEV)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                           pad_token_id=0)

    print("TORCH %s/transformers-%s" % (torch.__version__, transformers.__version__))
    print("TIME generate %.9f" % median_time(run, a.reps, torch))


def step(a, torch):
    try:
        import transformers
    except ImportError:
        print("UNAVAILABLE transformers is not installed")
        return
    q = a.quick
    torch.manual_seed(0)
    if a.model == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300 if q else 50257, n_positions=1024, n_embd=64 if q else 768,
                                      n_layer=2 if q else 12, n_head=4 if q else 12, n_inner=256 if q else 3072,
                                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).to(DEV)
        version = "%s/transformers-%s" % (torch.__version__, transformers.__version__)
    else:
        try:
            import peft
        except ImportError:
            print("UNAVAILABLE peft is not installed")
            return
        cfg = transformers.LlamaConfig(
            vocab_size=512 if q else 49152, hidden_size=64 if q else 576, intermediate_size=96 if q else 1536,
            num_hidden_layers=2 if q else 30, num_attention_heads=4 if q else 9, num_key_value_heads=2 if q else 3,
            head_dim=16 if q else 64, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True)
        lc = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).to(DEV), lc)
        version = "%s/transformers-%s/peft-%s" % (torch.__version__, transformers.__version__, peft.__version__)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    V = cfg.vocab_size
    ids = torch.randint(0, V, (a.B, a.T), device=DEV)

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    print("TORCH %s" % version)
    print("TIME step %.9f" % median_time(run, a.reps, torch))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "generate", "step"])
    p.add_argument("--model", default="gpt2")
    for k in ("B", "T", "C", "NH", "FF", "V", "params", "batch", "prompt", "new"):
        p.add_argument("--" + k, type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (to check this script)")
    a = p.parse_args()
    global DEV
    DEV = "cpu" if a.cpu else "cuda"
    try:
        import torch
    except ImportError:
        print("UNAVAILABLE torch is not installed")
        return 0
    if DEV == "cuda" and not torch.cuda.is_available():
        print("UNAVAILABLE torch has no CUDA device")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32, as cotlab's default
    torch.backends.cudnn.allow_tf32 = False
    if a.what == "train":
        print("TORCH %s" % torch.__version__)
        train(a, torch)
    elif a.what == "step":
        step(a, torch)
    else:
        generate(a, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
