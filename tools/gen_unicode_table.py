#!/usr/bin/env python3
"""Print the code-point class table that cotlab.h's pre-tokenizer uses (letters and numbers).

    python3 tools/gen_unicode_table.py > /tmp/table.c   (then paste over ctl__unicode_ranges)

Ranges of Unicode general categories L* (class 1) and N* (class 2), sorted, from Python's
unicodedata (its Unicode version is printed in the comment).
"""
import unicodedata

def main():
    rows, start, cls_prev = [], None, 0
    for cp in range(0x110001):
        c = unicodedata.category(chr(cp))[0] if cp <= 0x10FFFF else ""
        cls = 1 if c == "L" else 2 if c == "N" else 0
        if cls != cls_prev:
            if cls_prev: rows.append((start, cp - 1, cls_prev))
            start, cls_prev = cp, cls
    print("// Unicode %s letters (1) and numbers (2) as sorted [first, last] ranges; tools/gen_unicode_table.py" % unicodedata.unidata_version)
    print("static const uint32_t ctl__unicode_ranges[][3] = {")
    line = "   "
    for a, b, k in rows:
        item = " {0x%x, 0x%x, %d}," % (a, b, k)
        if len(line) + len(item) > 100:
            print(line)
            line = "   "
        line += item
    print(line)
    print("};")

main()
