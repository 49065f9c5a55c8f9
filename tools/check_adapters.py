#!/usr/bin/env python3
"""cotlab's exported adapters in llama.cpp and in PEFT, against cotlab's own forward.

    make build/adapter_parity && ./build/adapter_parity models/SmolLM2-135M-Instruct.Q4_1.gguf build/parity
    python3 tools/check_adapters.py build/parity models/SmolLM2-135M-Instruct.Q4_1.gguf
                                             (needs llama-cpp-python; torch, transformers, peft, gguf)

1. llama.cpp (llama-cpp-python) runs cotlab's F32 export of SmolLM2 with cotlab's LoRA GGUF
   (--lora) and alone; its next-token logits are compared with cotlab's (max |d| / max |ref|).
   It also runs cotlab's merged F32 export.
2. The same adapter on the original Q4_1 file: llama.cpp quantises activations there, so only the
   adapter's effect (logits with it minus logits without) is compared with cotlab's effect on its
   Q4_1 base kept quantised: cosine similarity and the ratio of norms.
3. transformers loads the F32 export (dequantised through its GGUF reader), PEFT loads cotlab's
   adapter_model.safetensors + adapter_config.json onto it; logits compared with cotlab's.
llama.cpp runs with an F32 KV cache (its default F16 cache alone costs about 1e-3).
Prints one line per check; exits 1 if a bound is missed (1e-3 relative; effect cosine >= 0.9 and
norm ratio within 30%, given llama.cpp's 8-bit activations on Q4_1).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ctlfix import read_fixture  # noqa: E402


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def llama_logits(model, tokens, lora=None):
    import llama_cpp
    kw = dict(model_path=model, n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)   # F32 KV cache
    if lora:
        kw["lora_path"] = lora
    lm = llama_cpp.Llama(**kw)
    out = []
    for t in tokens:
        lm.reset()
        lm.eval(list(t))
        out.append(np.array(lm.scores[lm.n_tokens - 1], dtype=np.float64))
    return out


def main():
    d, q4 = sys.argv[1], sys.argv[2]
    fx = dict(read_fixture(os.path.join(d, "parity.bin")))
    n = len([k for k in fx if k.startswith("prompt/")])
    tokens = [fx["prompt/%d" % i].astype(int) for i in range(n)]
    ours = {k: [fx["%s/%d" % (k, i)].astype(np.float64) for i in range(n)] for k in ("lora", "base", "q4_lora", "q4_base")}
    ok = True

    def report(what, vals, bound):
        nonlocal ok
        worst = max(vals)
        good = worst <= bound
        ok &= good
        print("%-62s %s %.2e (bound %.0e)" % (what, "ok  " if good else "FAIL", worst, bound))

    f32, lora, merged = (os.path.join(d, f) for f in ("base-f32.gguf", "lora.gguf", "merged-f32.gguf"))
    with_lora = llama_logits(f32, tokens, lora)
    report("llama.cpp, F32 base + cotlab LoRA GGUF vs cotlab", [rel(a, b) for a, b in zip(with_lora, ours["lora"])], 1e-3)
    report("llama.cpp, F32 base alone vs cotlab", [rel(a, b) for a, b in zip(llama_logits(f32, tokens), ours["base"])], 1e-3)
    report("llama.cpp, cotlab's merged F32 export vs cotlab + LoRA", [rel(a, b) for a, b in zip(llama_logits(merged, tokens), ours["lora"])], 1e-3)
    q4_base = llama_logits(q4, tokens)
    eff_lc = [a - b for a, b in zip(llama_logits(q4, tokens, lora), q4_base)]
    eff_us = [a - b for a, b in zip(ours["q4_lora"], ours["q4_base"])]
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(eff_lc, eff_us)]
    ratio = [float(np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(eff_lc, eff_us)]
    # llama.cpp quantises activations to 8 bits for Q4_1 products: its base logits differ from
    # cotlab's (fp32 activations on the same weights) by this much of the effect's size
    noise = [float(np.linalg.norm(a - b) / np.linalg.norm(e)) for a, b, e in zip(q4_base, ours["q4_base"], eff_us)]
    print("llama.cpp, Q4_1 base: the adapter's effect vs cotlab's on its Q4_1 base: cosine %s, norm ratio %s"
          % (" ".join("%.4f" % c for c in cos), " ".join("%.3f" % r for r in ratio)))
    print("  (llama.cpp's own base logits differ from cotlab's by %s of the effect's norm)" % " ".join("%.2f" % x for x in noise))
    good = min(cos) >= 0.9 and all(abs(r - 1) <= 0.3 for r in ratio)
    ok &= good
    print("%-62s %s" % ("  (cosine >= 0.9, norms within 30%)", "ok" if good else "FAIL"))

    import torch
    import transformers
    from peft import PeftModel
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="base-f32.gguf", torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, os.path.join(d, "peft")).eval()
    vals = []
    with torch.no_grad():
        for t, want in zip(tokens, ours["lora"]):
            got = pm(input_ids=torch.tensor([t])).logits[0, -1].double().numpy()
            vals.append(rel(got, want))
    report("transformers + PEFT, cotlab's PEFT adapter vs cotlab", vals, 1e-3)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
