#!/usr/bin/env python3
"""Write safetensors fixtures for the cotlab tests with the reference writers.

    python3 tools/make_safetensors_fixtures.py     (needs torch, transformers, safetensors)

Files in tests/fixtures/st/:
  sample.safetensors   written by safetensors.torch.save_file: F32 (2,3), F16 (4,), BF16 (3,2),
                       I64 (2,) (a dtype cotlab lists but does not convert), an F32 scalar (shape
                       []), an empty F32 (0,3), and __metadata__ with a quote and a non-ASCII char.
  sample_ref.bin       CTLFIX01 records "val/<name>": the float32 values torch reads back.
  gpt2_hf/, llama_hf/, llama_tied_hf/   model.safetensors written by transformers'
                       save_pretrained from the weights in tests/fixtures/<model>_tiny.bin, so the
                       C side can load Hugging Face's own files and compare with those fixtures.
  <model>_gen.bin      "prompt/i", "greedy/i": transformers' greedy generate (10 new tokens).
"""
import os
import sys

import numpy as np
import safetensors.torch
import torch
import transformers

import ctlfix
from ctlfix import write_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "st")


def sample():
    g = torch.Generator().manual_seed(7)
    t = {
        "a": torch.randn(2, 3, generator=g),
        "b": (torch.randn(4, generator=g) * 100).half(),
        "c": torch.randn(3, 2, generator=g).bfloat16(),
        "d": torch.tensor([5, -6], dtype=torch.int64),
        "e": torch.tensor(2.5),
        "f": torch.zeros(0, 3),
    }
    meta = {"format": "pt", "note": 'say "hi" \u2713'}
    safetensors.torch.save_file(t, os.path.join(OUT, "sample.safetensors"), metadata=meta)
    back = safetensors.torch.load_file(os.path.join(OUT, "sample.safetensors"))
    recs = [("val/" + k, back[k].float().numpy().astype(np.float32)) for k in "abcef"]
    write_fixture(os.path.join(OUT, "sample_ref.bin"), recs)


def hf_model(kind):
    fx = dict(ctlfix.read_fixture(os.path.join(ROOT, "tests", "fixtures", kind + "_tiny.bin")))
    c = fx["config"]
    if c[0] == 0:
        cfg = transformers.GPT2Config(vocab_size=int(c[1]), n_positions=int(c[2]), n_embd=int(c[3]), n_layer=int(c[4]),
                                      n_head=int(c[5]), bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
        sd = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
              "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
        conv = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        plain = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}
        state = {}
        for hf, ours in sd.items():
            state[hf] = fx["param/" + ours]
        for i in range(int(c[4])):
            for hf, ours in conv.items():
                state[f"transformer.h.{i}.{hf}.weight"] = fx[f"param/blk.{i}.{ours}.weight"].T
                state[f"transformer.h.{i}.{hf}.bias"] = fx[f"param/blk.{i}.{ours}.bias"]
            for hf, ours in plain.items():
                for s in ("weight", "bias"):
                    state[f"transformer.h.{i}.{hf}.{s}"] = fx[f"param/blk.{i}.{ours}.{s}"]
        state["lm_head.weight"] = fx["param/token_embd.weight"]
    else:
        cfg = transformers.LlamaConfig(vocab_size=int(c[1]), max_position_embeddings=int(c[2]), hidden_size=int(c[3]),
                                       num_hidden_layers=int(c[4]), num_attention_heads=int(c[5]),
                                       num_key_value_heads=int(c[6]), intermediate_size=int(c[8]),
                                       tie_word_embeddings=bool(c[9]), rms_norm_eps=float(fx["config_f"][0]))
        model = transformers.LlamaForCausalLM(cfg)
        names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
        state = {"model.embed_tokens.weight": fx["param/token_embd.weight"], "model.norm.weight": fx["param/output_norm.weight"]}
        for i in range(int(c[4])):
            for hf, ours in names.items():
                state[f"model.layers.{i}.{hf}.weight"] = fx[f"param/blk.{i}.{ours}.weight"]
        state["lm_head.weight"] = fx["param/token_embd.weight" if c[9] else "param/output.weight"]
    model.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()}, strict=False)
    out = os.path.join(OUT, kind + "_hf")
    model.save_pretrained(out, safe_serialization=True)
    for extra in os.listdir(out):   # keep only the weights
        if extra != "model.safetensors":
            os.remove(os.path.join(out, extra))
    # The saved model must still compute the fixture's log-probs.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(np.array(fx["tokens"]), dtype=torch.long)).logits
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(np.array(fx["targets"]), dtype=torch.long)[..., None])[..., 0]
    err = float((logp.numpy() - fx["logp"]).__abs__().max())
    assert err < 1e-5, (kind, err)
    # Greedy continuations by transformers' generate (KV cache), for the C generation tests.
    prompts = [[3, 17, 5, 42], [9]]
    recs = []
    for i, pr in enumerate(prompts):
        with torch.no_grad():
            g = model.generate(torch.tensor([pr]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                               eos_token_id=None, attention_mask=torch.ones(1, len(pr), dtype=torch.long))
        recs.append(("prompt/%d" % i, np.array(pr, dtype=np.int32)))
        recs.append(("greedy/%d" % i, g[0, len(pr):].numpy().astype(np.int32)))
    write_fixture(os.path.join(OUT, kind + "_gen.bin"), recs)
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    print("torch", torch.__version__, "transformers", transformers.__version__, "safetensors", safetensors.__version__)
    sample()
    for kind in ("gpt2", "llama", "llama_tied"):
        hf_model(kind)
    for dirpath, _, files in sorted(os.walk(OUT)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            print(os.path.relpath(p, ROOT), os.path.getsize(p))


if __name__ == "__main__":
    sys.exit(main())
