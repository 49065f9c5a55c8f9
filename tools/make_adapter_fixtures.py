#!/usr/bin/env python3
"""PEFT references for cotlab's LoRA and DoRA: loss and adapter gradients of tiny Llama models.

    python3 tools/make_adapter_fixtures.py      (needs torch, transformers, peft, safetensors)

For each variant a seeded LlamaForCausalLM (vocab 29, n_ctx 12, C 32, 2 layers, 4 heads, 2 KV
heads, FF 64, float32, eager attention) gets a PEFT adapter; lora_B (zero after PEFT's own
init), the DoRA magnitudes and the embedding LoRA are then set to random values so that every
gradient is informative. Written to tests/fixtures/peft/<variant>/:

    model.safetensors                  the base, from save_pretrained (Hugging Face names)
    adapter_model.safetensors, adapter_config.json    PEFT's save_pretrained
    ref.bin (CTLFIX01)   config int32 [vocab, n_ctx, C, L, NH, NKV, FF, tied, r]
                         tokens, targets (2, 9) int32, weights (2, 9) f32
                         loss f32 (1,): -sum(w * log_softmax(logits)[target]) / sum(w)
                         grad/<cotlab name> f32: d loss / d adapter tensor, in cotlab's
                         layout (lora_a (r, in), lora_b (out, r), lora_m (out); an embedding's
                         lora_a (V, r), lora_b (C, r)), Hugging Face (halves) RoPE row order

Variants: lora (tied, all-linear, r 4, alpha 8), dora (the same with use_dora), rslora_untied
(untied, all-linear plus embed_tokens and lm_head, r 3, alpha 6, use_rslora).
"""
import os
import shutil
import sys

import numpy as np
import torch

from ctlfix import write_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "peft")
HF2GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def cotlab_name(key):
    """base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight -> blk.1.attn_q.weight.lora_a"""
    parts = key.split(".")
    kind = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b",
            "lora_magnitude_vector": "lora_m"}
    k = next(p for p in parts if p in kind)
    if "embed_tokens" in parts:
        return "token_embd.weight." + kind[k]
    if "lm_head" in parts:
        return "output.weight." + kind[k]
    layer = parts[parts.index("layers") + 1]
    module = next(p for p in parts if p in HF2GGUF)
    return "blk.%s.%s.weight.%s" % (layer, HF2GGUF[module], kind[k])


def variant(name, tied, r, alpha, dora, rslora, extra_targets, seed):
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=29, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=12,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
                                   attn_implementation="eager", initializer_range=0.2)
    base = transformers.LlamaForCausalLM(cfg).float().eval()
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    base.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(d):
        if f not in ("model.safetensors",):
            os.remove(os.path.join(d, f))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] + extra_targets
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_dora=dora,
                      use_rslora=rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key or "lora_embedding" in key:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in key:
                p.mul_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
    model.save_pretrained(d, safe_serialization=True)
    for f in os.listdir(d):
        if f == "README.md":
            os.remove(os.path.join(d, f))
    gt = torch.Generator().manual_seed(seed + 2)
    tokens = torch.randint(0, 29, (2, 9), generator=gt)
    tgts = torch.randint(0, 29, (2, 9), generator=gt)
    w = torch.ones(2, 9)
    w[:, :2] = 0.0
    model.train()   # dropout is 0: train mode changes nothing but is what training runs
    logits = model(input_ids=tokens).logits
    logp = torch.log_softmax(logits.float(), -1).gather(-1, tgts[..., None])[..., 0]
    loss = -(w * logp).sum() / w.sum()
    loss.backward()
    recs = [("config", np.array([29, 12, 32, 2, 4, 2, 64, int(tied), r], dtype=np.int32)),
            ("tokens", tokens.numpy().astype(np.int32)), ("targets", tgts.numpy().astype(np.int32)),
            ("weights", w.numpy().astype(np.float32)), ("loss", np.array([loss.item()], dtype=np.float32))]
    n = 0
    for key, p in model.named_parameters():
        if p.grad is None or "lora" not in key:
            continue
        gr = p.grad.detach().numpy().astype(np.float32)
        cn = cotlab_name(key)
        if "lora_embedding_A" in key:   # PEFT (r, V); cotlab (V, r)
            gr = np.ascontiguousarray(gr.T)
        recs.append(("grad/" + cn, gr))
        n += 1
    write_fixture(os.path.join(d, "ref.bin"), recs)
    print(name, "loss %.6f," % loss.item(), n, "adapter gradients;", d)


def main():
    import peft
    import transformers
    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
    variant("lora", True, 4, 8, False, False, [], 1)
    variant("dora", True, 4, 8, True, False, [], 2)
    variant("rslora_untied", False, 3, 6, False, True, ["embed_tokens", "lm_head"], 3)


if __name__ == "__main__":
    sys.exit(main())
