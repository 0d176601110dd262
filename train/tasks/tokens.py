"""A causal language model trained on a token corpus on disk or in object storage.

The corpus is a flat array of token ids (nanoGPT's `.bin` format: little-endian uint16, or uint32
for vocabularies over 65,536), read in place: a numpy memmap for a local path, ranged reads for any
other fsspec URI (`s3://...`; `simplecache::s3://...` copies the file to local disk once). A
`<corpus>.json` written by `scripts/prepare_tokens.py` beside it gives the vocabulary size and
dtype; task_args override it.

The corpus is cut into windows of `seq_len + 1` tokens (inputs and shifted targets), `seq_len`
apart. The last `eval_fraction` of them are held out for `eval_sample`; the others are visited in a
fresh permutation each epoch, drawn from (seed, epoch) alone. So sample `index` is always the same
window, whatever the world size and whatever failed before: exact resume and elastic resizing keep
working.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Dict, Optional, Tuple

import fsspec
import numpy as np
import torch

from train.data import sample_seed
from train.tasks.gpt import CausalLM

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_meta(path: str) -> Dict[str, object]:
    """The `<path>.json` beside a corpus ({} when there is none)."""
    meta = path[:-4] + ".json" if path.endswith(".bin") else path + ".json"
    fs, p = fsspec.core.url_to_fs(meta)
    if not fs.exists(p):
        return {}
    with fs.open(p, "r") as f:
        return json.load(f)


class _Corpus:
    """Token ids of one file, read by window; opened lazily in each process (not pickled)."""

    def __init__(self, path: str, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.fs, self._p = fsspec.core.url_to_fs(path)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        try:
            size = self.fs.size(self._p)
        except FileNotFoundError:
            raise ValueError(f"train.task_args.path={path!r}: no such file (make one with "
                             "scripts/prepare_tokens.py)") from None
        if size is None or size % dtype.itemsize:
            raise ValueError(f"train.task_args.path={path!r}: {size} bytes is not a whole number "
                             f"of {dtype.name} tokens (set train.task_args.dtype)")
        self.tokens = size // dtype.itemsize
        self._memmap: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "_memmap": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def read(self, start: int, count: int) -> np.ndarray:
        if self.local:
            if self._memmap is None:
                with self._lock:
                    if self._memmap is None:
                        self._memmap = np.memmap(self._p, dtype=self.dtype, mode="r")
            return np.array(self._memmap[start:start + count])
        item = self.dtype.itemsize
        raw = self.fs.cat_file(self._p, start=start * item, end=(start + count) * item)
        return np.frombuffer(raw, dtype=self.dtype)


class TokenWindows:
    """The data side of a corpus task (a mixin before a model's Task class): `sample` and
    `eval_sample` as windows of the corpus. Call `_open_corpus` from `__init__`."""

    seq_len: int

    def _open_corpus(self, path: str, seq_len: int, eval_fraction: float,
                     vocab_size: Optional[int], dtype: Optional[str]) -> None:
        if not path:
            raise ValueError("train.task_args.path is required: the corpus (.bin of token ids; "
                             "scripts/prepare_tokens.py makes one from a text file)")
        if seq_len < 1:
            raise ValueError(f"seq_len ({seq_len}) must be at least 1")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction ({eval_fraction}) must be in [0, 1)")
        meta = read_meta(path)
        dtype = dtype or str(meta.get("dtype", "uint16"))
        if dtype not in DTYPES:
            raise ValueError(f"train.task_args.dtype={dtype!r}: one of {', '.join(DTYPES)}")
        self.corpus = _Corpus(path, DTYPES[dtype])
        self.vocab_size = int(vocab_size or meta.get("vocab_size", 0) or 0)
        if self.vocab_size < 2:
            raise ValueError(f"train.task_args.vocab_size: {path!r} has no .json beside it "
                             "saying its vocabulary size; give one")
        self.seq_len = seq_len
        windows = (self.corpus.tokens - 1) // seq_len
        held = int(math.ceil(windows * eval_fraction)) if eval_fraction > 0 else 0
        self.train_windows, self.eval_windows = windows - held, held
        if self.train_windows < 1:
            raise ValueError(f"train.task_args.path={path!r}: {self.corpus.tokens} tokens make no "
                             f"training window of seq_len {seq_len} + 1 (lower seq_len or "
                             "eval_fraction)")
        self._perm: Tuple[int, Optional[torch.Tensor]] = (-1, None)
        self._perm_lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "_perm": (-1, None), "_perm_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._perm_lock = threading.Lock()

    # ---- data ----------------------------------------------------------------------------
    def window_of(self, index: int, seed: int) -> int:
        """The training window sample `index` reads: position index % n of epoch index // n's
        permutation, drawn from (seed, epoch) alone."""
        epoch, pos = divmod(index, self.train_windows)
        with self._perm_lock:
            cached, perm = self._perm
            if cached != epoch or perm is None:
                g = torch.Generator().manual_seed(sample_seed(seed, -(1 << 40) - epoch))
                perm = torch.randperm(self.train_windows, generator=g)
                self._perm = (epoch, perm)
        return int(perm[pos])

    def _window(self, start: int) -> Dict[str, torch.Tensor]:
        ids = self.corpus.read(start, self.seq_len + 1)
        top = int(ids.max())
        if top >= self.vocab_size:
            raise ValueError(f"{self.corpus.path}: token id {top} near token {start} is outside "
                             f"train.task_args.vocab_size={self.vocab_size}")
        return {"tokens": torch.from_numpy(ids.astype(np.int64))}

    def sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        return self._window(self.window_of(index, seed) * self.seq_len)

    def eval_sample(self, index: int, seed: int) -> Dict[str, torch.Tensor]:
        """Held-out window `index` (cycling): the held-out part starts one token after the last
        training window ends, so not a token of it is ever trained on."""
        if not self.eval_windows:
            raise ValueError("train.task_args.eval_fraction is 0: the corpus holds nothing out "
                             "for train.eval_interval_steps")
        first = self.train_windows * self.seq_len + 1
        return self._window(first + (index % self.eval_windows) * self.seq_len)


class TokenCorpus(TokenWindows, CausalLM):
    """TinyGPT's model on a real corpus. task_args: `path` (required), `seq_len`, `dim`,
    `layers`, `heads`, `lr`, `warmup_steps`, `eval_fraction`, and `vocab_size` / `dtype` when
    the corpus has no `.json` beside it."""

    def __init__(self, path: str = "", seq_len: int = 128, dim: int = 128, layers: int = 2,
                 heads: int = 4, lr: float = 3e-3, warmup_steps: int = 20,
                 eval_fraction: float = 0.05, vocab_size: Optional[int] = None,
                 dtype: Optional[str] = None):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self._open_corpus(path, seq_len, eval_fraction, vocab_size, dtype)
        self.dim, self.layers, self.heads = dim, layers, heads
        self.lr, self.warmup_steps = lr, warmup_steps
