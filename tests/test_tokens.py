"""The token-corpus task and scripts/prepare_tokens.py: what a window is, that sample `index` is
the same window whatever else happens, that the held-out windows are never trained on, and the
errors a user gets for a bad corpus."""

import json
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch

from conftest import ROOT
from train.tasks.tokens import TokenCorpus

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from prepare_tokens import prepare  # noqa: E402

pytestmark = pytest.mark.unit

# Words in a seeded random order: no two windows of the corpus are alike.
_WORDS = "it was the best of times worst age wisdom foolishness héllo wörld".split()
TEXT = " ".join(_WORDS[int(i)] for i in np.random.default_rng(0).integers(0, len(_WORDS), 2000))


def _corpus(tmp_path, text=TEXT, name="c.bin"):
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    out = str(tmp_path / name)
    prepare(out, [str(src)], progress=lambda line: None)
    return out


def test_prepare_writes_bytes_as_uint16_with_its_meta(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abc", encoding="utf-8")
    b.write_text("é", encoding="utf-8")  # two UTF-8 bytes
    out = str(tmp_path / "sub" / "corpus.bin")
    assert prepare(out, [str(a), str(b)], progress=None) == 5
    ids = np.fromfile(out, dtype="<u2")
    assert ids.tolist() == [97, 98, 99, 0xC3, 0xA9]
    meta = json.load(open(out[:-4] + ".json"))
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16" and meta["tokens"] == 5
    assert not os.path.exists(out + ".partial")


def test_prepare_refuses_to_overwrite_and_says_how(tmp_path):
    out = _corpus(tmp_path)
    before = open(out, "rb").read()
    src = tmp_path / "other.txt"
    src.write_text("something else entirely", encoding="utf-8")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "prepare_tokens.py"), out, str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "exists: give --force" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and open(out, "rb").read() == before
    bad = subprocess.run(cmd[:2] + [str(tmp_path / "x.tok"), str(src)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "must end in .bin" in bad.stderr
    gone = subprocess.run(cmd[:2] + [str(tmp_path / "y.bin"), str(tmp_path / "nope.txt")],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "nope.txt: no such file" in gone.stderr
    ok = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "23 tokens" in ok.stdout


def test_a_sample_is_a_window_and_its_shifted_targets(tmp_path):
    out = _corpus(tmp_path)
    task = TokenCorpus(path=out, seq_len=16, dim=32, heads=4)
    ids = np.fromfile(out, dtype="<u2")
    s = task.sample(5, seed=3)["tokens"]
    w = task.window_of(5, seed=3)
    assert s.dtype == torch.int64 and s.shape == (17,)
    assert s.tolist() == ids[w * 16:w * 16 + 17].tolist()
    assert torch.equal(TokenCorpus(path=out, seq_len=16, dim=32).sample(5, 3)["tokens"], s)


def test_each_epoch_visits_every_training_window_once_in_a_seeded_order(tmp_path):
    task = TokenCorpus(path=_corpus(tmp_path), seq_len=16, dim=32, eval_fraction=0.1)
    n = task.train_windows
    assert n > 100 and task.eval_windows == int(np.ceil((n + task.eval_windows) * 0.1))
    epoch0 = [task.window_of(i, seed=0) for i in range(n)]
    epoch1 = [task.window_of(i, seed=0) for i in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1, "a fresh order each epoch"
    assert epoch0 != [task.window_of(i, seed=1) for i in range(n)], "the seed decides the order"
    # Random access (another world size's slicing, a resume) gives the same windows.
    assert [task.window_of(i, seed=0) for i in reversed(range(n + 5))][::-1][:n] == epoch0


def test_the_held_out_windows_are_never_trained_on(tmp_path):
    out = _corpus(tmp_path)
    task = TokenCorpus(path=out, seq_len=16, dim=32, eval_fraction=0.05)
    ids = np.fromfile(out, dtype="<u2")
    # The last token any training window reads, over two epochs:
    last = max(task.window_of(i, 0) * 16 + 16 for i in range(2 * task.train_windows))
    assert last == task.train_windows * 16
    for i in range(task.eval_windows):
        start = last + 1 + i * 16
        assert task.eval_sample(i, 0)["tokens"].tolist() == ids[start:start + 17].tolist()
    assert start + 17 <= len(ids)
    assert torch.equal(task.eval_sample(task.eval_windows, 0)["tokens"],
                       task.eval_sample(0, 0)["tokens"])
    none = TokenCorpus(path=_corpus(tmp_path, name="d.bin"), seq_len=16, dim=32,
                       eval_fraction=0)
    with pytest.raises(ValueError, match="eval_fraction is 0"):
        none.eval_sample(0, 0)


def test_any_fsspec_uri_reads_the_same_windows(tmp_path):
    local = _corpus(tmp_path)
    with fsspec.open("memory://corpora/c.bin", "wb") as f:
        f.write(open(local, "rb").read())
    with fsspec.open("memory://corpora/c.json", "w") as f:
        f.write(open(local[:-4] + ".json").read())
    a = TokenCorpus(path=local, seq_len=16, dim=32)
    b = TokenCorpus(path="memory://corpora/c.bin", seq_len=16, dim=32)
    assert not b.corpus.local and a.corpus.local
    for i in (0, 7, 500):
        assert torch.equal(a.sample(i, 0)["tokens"], b.sample(i, 0)["tokens"])
    assert torch.equal(a.eval_sample(1, 0)["tokens"], b.eval_sample(1, 0)["tokens"])


def test_bad_corpora_get_errors_that_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="train.task_args.path is required"):
        TokenCorpus()
    with pytest.raises(ValueError, match="no such file.*prepare_tokens"):
        TokenCorpus(path=str(tmp_path / "missing.bin"))
    raw = tmp_path / "raw.bin"
    np.arange(300, dtype="<u2").tofile(raw)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenCorpus(path=str(raw), seq_len=8, dim=32)  # no .json beside it
    small = TokenCorpus(path=str(raw), seq_len=8, dim=32, vocab_size=100)
    with pytest.raises(ValueError, match="token id .* outside train.task_args.vocab_size=100"):
        [small.sample(i, 0) for i in range(small.train_windows)]
    with pytest.raises(ValueError, match="no training window"):
        TokenCorpus(path=str(raw), seq_len=400, dim=32, vocab_size=300)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ValueError, match="whole number of uint16"):
        TokenCorpus(path=str(odd), vocab_size=256)
    with pytest.raises(ValueError, match="dtype='int8'"):
        TokenCorpus(path=str(raw), vocab_size=300, dtype="int8")


def test_the_task_trains_a_step_and_its_loss_starts_near_uniform(tmp_path):
    task = TokenCorpus(path=_corpus(tmp_path), seq_len=16, dim=32, heads=4)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.collate([task.sample(i, 0) for i in range(4)])
    loss = task.loss(model, batch)
    assert abs(loss.item() - np.log(256)) < 1.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(task.fsdp_units(model)) == 2
