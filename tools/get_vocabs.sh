#!/usr/bin/env bash
# Puts llama.cpp's vocabulary-only GGUF files for GPT-2, Llama-3 ("llama-bpe") and Qwen2 in
# models/vocab/, with llama.cpp's own test strings and Hugging Face token ids for them (.inp,
# .out). They ship in the source package of llama-cpp-python on PyPI (77 MB download, 16 MB kept).
set -euo pipefail
cd "$(dirname "$0")/.."
names="gpt-2 llama-bpe qwen2"
dir=models/vocab
have=1
for n in $names; do [ -f "$dir/ggml-vocab-$n.gguf.out" ] || have=0; done
[ $have = 1 ] && { echo "$dir is already there"; exit 0; }
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp"
python3 - "$tmp" "$dir" $names <<'PY'
import glob, os, sys, tarfile
src, dst, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with tarfile.open(glob.glob(src + "/llama_cpp_python-*.tar.gz")[0]) as tar:
    for m in tar.getmembers():
        base = os.path.basename(m.name)
        if "/vendor/llama.cpp/models/" in m.name and any(base.startswith("ggml-vocab-%s.gguf" % n) for n in names):
            with tar.extractfile(m) as f, open(os.path.join(dst, base) + ".tmp", "wb") as out:
                out.write(f.read())
            os.replace(os.path.join(dst, base) + ".tmp", os.path.join(dst, base))
PY
ls -l "$dir"
