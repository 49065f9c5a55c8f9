#!/usr/bin/env python3
"""Token ids for SmolLM2-135M-Instruct's tokenizer on real and awkward text.

    tools/get_smollm2.sh && python3 tools/make_tokenizer_fixtures.py   (needs transformers, gguf;
                                                   llama-cpp-python for the llama.cpp reference)

The strings: the questions and answers of ../shared/data/gsm8k/dev.jsonl (the first 500 lines,
1000 strings) and hand-picked hard cases (spaces, newlines, tabs, digit runs, contractions,
accents, CJK, emoji, mixed scripts, chat special tokens). The reference is llama.cpp's own
tokenizer for the GGUF (llama_cpp.Llama(vocab_only=True).tokenize(..., add_bos=False,
special=True)) when llama-cpp-python is installed; the Hugging Face tokenizer built from the
same GGUF is run too, and every string where the two disagree is printed (the file follows
llama.cpp). Writes tests/fixtures/smollm2/tokens.bin: "text/i" (the UTF-8 bytes, one int32
each) and "ids/i"; and tests/fixtures/smollm2/chat.bin: three conversations rendered with and
without the generation prompt by SmolLM2's own template (transformers) and by Meta's Llama-3
template (jinja2), "chatml/i/g" and "llama3/i/g", plus that Llama-3 template as "llama3_template".
"""
import json
import os
import sys

import numpy as np

from ctlfix import write_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
HARD = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c", "tab\there", "new\nline", "two\n\nlines", " \n ", "\r\n",
    "12345678901234567890", "3.14159", "1,000,000", "x = 42;", "$1.50", "2024-11-25",
    "I'm", "you're", "they've", "we'll", "he'd", "it's", "DON'T", "rock 'n' roll", "'s'",
    "café", "naïve", "Ångström", "façade", "Über", "Ελληνικά", "Русский текст", "עברית", "العربية",
    "日本語のテキスト", "中文字符", "한국어", "emoji 😀🎉👍🏽", "mixed: abc123αβγ٣", "ﬁ ligature", "\u00a0nbsp", "zero\u200bwidth",
    "<|im_start|>user\nHello<|im_end|>\n", "<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "<|im_start", "Hello, World!!! ...", "C++ && Python || Rust", "e.g. i.e. etc.", "!!!???", "    def f(x):\n        return x",
]


def strings():
    out = []
    with open(os.path.join(ROOT, "..", "shared", "data", "gsm8k", "dev.jsonl")) as f:
        for line in list(f)[:500]:
            d = json.loads(line)
            out += [d["question"], d["answer"]]
    return out + HARD


CONVERSATIONS = [
    [("user", "What is 7 times 8?")],
    [("system", "You are terse."), ("user", "Name a colour.")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "  Tell me a joke.  ")],
]
# Meta's Llama-3-Instruct chat template, as shipped in its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def chat_fixture(hf):
    """ChatML as transformers renders SmolLM2's own template; Llama-3 rendered by jinja2."""
    import jinja2
    recs = [("llama3_template", np.frombuffer(LLAMA3_TEMPLATE.encode(), dtype=np.uint8).astype(np.int32))]
    tpl = jinja2.Environment().from_string(LLAMA3_TEMPLATE)
    for i, conv in enumerate(CONVERSATIONS):
        msgs = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            a = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            b = tpl.render(messages=msgs, add_generation_prompt=gen, bos_token="<|begin_of_text|>")
            recs.append(("chatml/%d/%d" % (i, gen), np.frombuffer(a.encode(), dtype=np.uint8).astype(np.int32)))
            recs.append(("llama3/%d/%d" % (i, gen), np.frombuffer(b.encode(), dtype=np.uint8).astype(np.int32)))
    write_fixture(os.path.join(ROOT, "tests", "fixtures", "smollm2", "chat.bin"), recs)


def main():
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    chat_fixture(hf)
    try:
        import llama_cpp
        lc = llama_cpp.Llama(model_path=GGUF, vocab_only=True, verbose=False)
        ref = lambda s: lc.tokenize(s.encode(), add_bos=False, special=True)
        print("reference: llama.cpp", llama_cpp.__version__)
    except ImportError:
        lc = None
        ref = lambda s: hf(s, add_special_tokens=False)["input_ids"]
        print("reference: Hugging Face tokenizer (llama-cpp-python is not installed)")
    recs, disagree = [], 0
    for i, s in enumerate(strings()):
        ids = ref(s)
        if lc is not None:
            h = hf(s, add_special_tokens=False)["input_ids"]
            if list(h) != list(ids):
                disagree += 1
                print("differ:", repr(s)[:60], "llama.cpp", list(ids)[:12], "hf", list(h)[:12])
        recs.append(("text/%d" % i, np.frombuffer(s.encode(), dtype=np.uint8).astype(np.int32)))
        recs.append(("ids/%d" % i, np.array(ids, dtype=np.int32)))
    out = os.path.join(ROOT, "tests", "fixtures", "smollm2", "tokens.bin")
    write_fixture(out, recs)
    print(len(recs) // 2, "strings;", disagree, "disagreements;", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    sys.exit(main())
