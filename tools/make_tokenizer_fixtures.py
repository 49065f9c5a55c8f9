#!/usr/bin/env python3
"""Token ids of four byte-level BPE tokenizers on real and awkward text, from llama.cpp.

    tools/get_smollm2.sh && tools/get_vocabs.sh && python3 tools/make_tokenizer_fixtures.py
                                              (needs llama-cpp-python, transformers, gguf, jinja2)

The tokenizers: SmolLM2-135M-Instruct's ("smollm" pre-tokenizer), and llama.cpp's vocabulary
files for GPT-2 ("gpt-2"), Llama-3 ("llama-bpe") and Qwen2 ("qwen2"). The strings: the questions
and answers of examples/gsm8k/dev.jsonl (the first 500 lines, 1000 strings) and hand-picked
hard cases (spaces, newlines, carriage returns, tabs, digit runs, contractions in either case,
accents, CJK, emoji, mixed scripts, Unicode spaces, chat special tokens). The reference is
llama.cpp's own tokenizer for each file (llama_cpp.Llama(vocab_only=True).tokenize(...,
add_bos=False, special=True)); the Hugging Face tokenizer built from the same GGUF is run too where
transformers can build one, and every string where the two disagree is printed (the file follows
llama.cpp). Writes tests/fixtures/tokens.bin: "text/i" (the UTF-8 bytes) and "<name>/i" for each
tokenizer; and tests/fixtures/chat.bin: three conversations rendered with and without the
generation prompt by SmolLM2's own template (transformers), Meta's Llama-3 template and the Qwen2
vocabulary file's template (jinja2), "chatml/i/g", "llama3/i/g" and "qwen2/i/g", plus that
Llama-3 template as "llama3_template".
"""
import json
import os
import sys

import numpy as np

from ctlfix import write_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
VOCABS = [("smollm2", GGUF)] + [
    (name, os.path.join(ROOT, "models", "vocab", "ggml-vocab-%s.gguf" % file))
    for name, file in (("gpt2", "gpt-2"), ("llama3", "llama-bpe"), ("qwen2", "qwen2"))]
HARD = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c", "tab\there", "new\nline", "two\n\nlines", " \n ", "\r\n",
    "12345678901234567890", "3.14159", "1,000,000", "x = 42;", "$1.50", "2024-11-25",
    "I'm", "you're", "they've", "we'll", "he'd", "it's", "DON'T", "rock 'n' roll", "'s'",
    "café", "naïve", "Ångström", "façade", "Über", "Ελληνικά", "Русский текст", "עברית", "العربية",
    "日本語のテキスト", "中文字符", "한국어", "emoji 😀🎉👍🏽", "mixed: abc123αβγ٣", "ﬁ ligature", "\u00a0nbsp", "zero\u200bwidth",
    "<|im_start|>user\nHello<|im_end|>\n", "<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "<|im_start", "Hello, World!!! ...", "C++ && Python || Rust", "e.g. i.e. etc.", "!!!???", "    def f(x):\n        return x",
    "I'M", "YOU'RE", "They'Ve", "WE'LL", "it'S", "'LL", "'Re'", "x'y", "\r\n\r\n", "a\r\nb", "line\n\n\nend", " \n\n ",
    "a\t\tb", "tabs\t\n\tand", "1234567", " 12345", "x1234y", "12 345 6789", "(1+2)*3=9", "...\n\n", "!!\r\n",
    "end  ", "two  spaces", "\u3000ideographic\u3000space", "\u2003em\u2009thin", "ä\u0308 combining",
    "<|begin_of_text|>hi<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "<|endoftext|>x",
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
    """ChatML as transformers renders SmolLM2's own template; Llama-3 and the Qwen2 vocabulary
    file's ChatML template (which adds a default system line) rendered by jinja2."""
    import gguf
    import jinja2
    u8 = lambda text: np.frombuffer(text.encode(), dtype=np.uint8)
    qwen2 = gguf.GGUFReader(VOCABS[3][1]).fields["tokenizer.chat_template"].contents()
    recs = [("llama3_template", u8(LLAMA3_TEMPLATE))]
    env = jinja2.Environment()
    llama3, qwen = env.from_string(LLAMA3_TEMPLATE), env.from_string(qwen2)
    for i, conv in enumerate(CONVERSATIONS):
        msgs = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            a = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            b = llama3.render(messages=msgs, add_generation_prompt=gen, bos_token="<|begin_of_text|>")
            c = qwen.render(messages=msgs, add_generation_prompt=gen)
            recs += [("chatml/%d/%d" % (i, gen), u8(a)), ("llama3/%d/%d" % (i, gen), u8(b)), ("qwen2/%d/%d" % (i, gen), u8(c))]
    write_fixture(os.path.join(ROOT, "tests", "fixtures", "chat.bin"), recs)


def main():
    import llama_cpp
    import transformers
    hf_smollm2 = transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    chat_fixture(hf_smollm2)
    print("reference: llama.cpp", llama_cpp.__version__)
    texts = strings()
    recs = [("text/%d" % i, np.frombuffer(t.encode(), dtype=np.uint8)) for i, t in enumerate(texts)]
    for name, path in VOCABS:
        lc = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        try:
            hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        except Exception as e:   # not every vocabulary-only file converts
            hf = None
            print(name, ": no Hugging Face tokenizer from the GGUF (%s)" % str(e)[:80])
        disagree = 0
        for i, t in enumerate(texts):
            ids = lc.tokenize(t.encode(), add_bos=False, special=True)
            if hf is not None:
                h = hf(t, add_special_tokens=False)["input_ids"]
                if list(h) != list(ids):
                    disagree += 1
                    print(name, "differ:", repr(t)[:60], "llama.cpp", list(ids)[:12], "hf", list(h)[:12])
            recs.append(("%s/%d" % (name, i), np.array(ids, dtype=np.int32)))
        print(name, len(texts), "strings;", disagree if hf is not None else "-", "disagreements with Hugging Face")
    out = os.path.join(ROOT, "tests", "fixtures", "tokens.bin")
    write_fixture(out, recs)
    print(out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    sys.exit(main())
