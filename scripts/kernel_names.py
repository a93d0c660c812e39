#!/usr/bin/env python3
"""Kernel names a preprocessed kernels/*.cu declares, one per line, sorted.

    scripts/kernel_names.py FILE.i

Kernels are `extern "C"` functions marked __global__ (expanded to __attribute__((global)) by the
CUDA and HIP headers; left as written by the CPU emulator's). Reading the preprocessed text
resolves kernels stamped out by macros (NAME##N); attributes may sit before or after `void`.
Used by scripts/check-kernels.sh and scripts/build-hip-emulator.sh.
"""
import re, sys

text = "\n".join(l for l in open(sys.argv[1]) if not l.lstrip().startswith("#"))
word = re.compile(r"\s*([A-Za-z_]\w*)")
paren = re.compile(r"\s*\(")

def after_parens(i):
    depth = 0
    while i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            return i
    return i

names = set()
for m in re.finditer(r'extern\s+"C"\s', text):
    i, is_kernel = m.end(), False
    while (w := word.match(text, i)):
        tok, i = w.group(1), w.end()
        p = paren.match(text, i)
        if tok in ("__attribute__", "__launch_bounds__", "__declspec") and p:
            end = after_parens(p.end() - 1)
            is_kernel |= tok == "__attribute__" and re.search(r"\bglobal\b", text[i:end]) is not None
            i = end
        elif tok == "__global__":
            is_kernel = True
        elif p:
            if is_kernel:
                names.add(tok)
            break
print("\n".join(sorted(names)))
