"""Turn text files into a token corpus for train.tasks.tokens:TokenCorpus.

    python scripts/prepare_tokens.py OUT.bin INPUT [INPUT ...]

The tokenizer is byte-level (each UTF-8 byte is a token, vocabulary 256): nothing to download, any
language, any file. The tokens are written as a flat little-endian uint16 array (nanoGPT's `.bin`
format) with `OUT.json` beside it ({"vocab_size": 256, "dtype": "uint16", "tokens": N,
"tokenizer": "bytes", "sources": [...]}), which the task reads. Inputs and output may be local
paths or any fsspec URI (`s3://bucket/corpus.bin`); inputs are concatenated in the order given.
An existing OUT is never overwritten unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import fsspec
import numpy as np

CHUNK = 16 << 20  # bytes of text read (and tokens written) at a time


def prepare(out: str, inputs, force: bool = False, progress=print) -> int:
    """Write the corpus; returns the number of tokens."""
    if not out.endswith(".bin"):
        raise ValueError(f"{out}: the corpus name must end in .bin (its .json goes beside it)")
    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path) and not force:
        raise ValueError(f"{out} exists: give --force to replace it, or another name")
    for src in inputs:
        sfs, sp = fsspec.core.url_to_fs(src)
        if not sfs.exists(sp):
            raise ValueError(f"{src}: no such file")
    tokens, t0, last = 0, time.monotonic(), time.monotonic()
    if "/" in path.strip("/"):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".partial"
    with fs.open(tmp, "wb") as f:
        for src in inputs:
            with fsspec.open(src, "rb") as g:
                while True:
                    chunk = g.read(CHUNK)
                    if not chunk:
                        break
                    f.write(np.frombuffer(chunk, dtype=np.uint8).astype("<u2").tobytes())
                    tokens += len(chunk)
                    if time.monotonic() - last > 5:
                        last = time.monotonic()
                        progress(f"prepare_tokens: {tokens / 1e6:.1f}M tokens "
                                 f"({tokens / (last - t0) / 1e6:.1f}M/s)")
    if tokens < 2:
        fs.rm(tmp)
        raise ValueError(f"{', '.join(inputs)}: fewer than 2 bytes of text, no corpus to make")
    fs.mv(tmp, path)
    meta = {"vocab_size": 256, "dtype": "uint16", "tokens": tokens, "tokenizer": "bytes",
            "sources": list(inputs)}
    with fs.open(path[:-4] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the corpus to write (.bin; a .json goes beside it)")
    ap.add_argument("inputs", nargs="+", help="text files (local paths or fsspec URIs)")
    ap.add_argument("--force", action="store_true", help="replace an existing corpus")
    args = ap.parse_args(argv)
    try:
        n = prepare(args.out, args.inputs, force=args.force)
    except (ValueError, OSError) as e:
        print(f"prepare_tokens: {e}", file=sys.stderr)
        return 2
    print(f"prepare_tokens: {args.out}: {n} tokens (byte-level, vocabulary 256) from "
          f"{len(args.inputs)} file{'s' if len(args.inputs) > 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
