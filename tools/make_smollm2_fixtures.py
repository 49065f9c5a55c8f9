#!/usr/bin/env python3
"""Reference logits and greedy continuations for SmolLM2-135M-Instruct (the GGUF in models/).

    tools/get_smollm2.sh && python3 tools/make_smollm2_fixtures.py   (needs torch, transformers, gguf, accelerate)

Hugging Face transformers loads the same GGUF (from_pretrained(..., gguf_file=...)), which
dequantises every weight to fp32, so both sides compute the same fp32 function. The prompts are
tokenized here by the Hugging Face tokenizer built from the GGUF; the C side reads the ids.

Writes tests/fixtures/smollm2/ref.bin (CTLFIX01): for each prompt i, "prompt/i" (int32 ids),
"logits/i" (float32, vocab: the next-token logits after the prompt) and "greedy/i" (int32, the
32-token greedy continuation with the KV cache, no stop token); then the same model with every
matrix rounded to bf16 (torch's round to nearest even) and computed in fp32, as cotlab's
ctl_model_desc.bf16 loads it: "bf16_greedy/i" for every prompt, "bf16_logits/i" for the even ones.
"""
import os
import sys

import numpy as np

from ctlfix import write_fixture
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS_TEXT = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
]
PROMPTS_CHAT = [
    [{"role": "user", "content": "What is 7 times 8?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write one word: hello"}],
    [{"role": "user", "content": "Janet has 3 apples and buys 2 more. How many apples?"}],
]


def main():
    models = os.path.join(ROOT, "models")
    tok = transformers.AutoTokenizer.from_pretrained(models, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(models, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    ids = [tok(t)["input_ids"] for t in PROMPTS_TEXT]
    ids += [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in PROMPTS_CHAT]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    recs = []

    def run(x):
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, -1].float().numpy()
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=2)
        return logits.astype(np.float32), g[0, x.shape[1]:].numpy().astype(np.int32)

    for i, p in enumerate(ids):
        logits, cont = run(torch.tensor([p]))
        recs += [("prompt/%d" % i, np.array(p, dtype=np.int32)), ("logits/%d" % i, logits), ("greedy/%d" % i, cont)]
        print(i, len(p), repr(tok.decode(cont))[:80])
    with torch.no_grad():
        for prm in model.parameters():
            if prm.dim() == 2:
                prm.copy_(prm.to(torch.bfloat16).float())
    for i, p in enumerate(ids):
        logits, cont = run(torch.tensor([p]))
        recs += [("bf16_greedy/%d" % i, cont)] + ([("bf16_logits/%d" % i, logits)] if i % 2 == 0 else [])
        print("bf16", i, repr(tok.decode(cont))[:80])
    out = os.path.join(ROOT, "tests", "fixtures", "smollm2", "ref.bin")
    write_fixture(out, recs)
    print("torch", torch.__version__, "transformers", transformers.__version__, "->", out, os.path.getsize(out))


if __name__ == "__main__":
    sys.exit(main())
