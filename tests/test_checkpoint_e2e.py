"""Checkpoints end to end: kill the whole job, rerun the same command; kill a worker mid-persist."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import NO_CHAOS, ROOT, run_cli
from conftest import run_events as _events, run_summary as _summary
from coordinator.checkpoint import manifest as mf
from dist_harness import run_world
from train.state import weights_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")


def _start(args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    # A session of its own, so the whole job (driver, raylets, workers) can be killed at once.
    return subprocess.Popen([sys.executable, "-m", "coordinator", "run", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _kill_job(proc, run_dir):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for e in _events(run_dir):  # workers live in their raylet's session: kill them by pid
        if e["event"] == "worker_start":
            try:
                os.kill(e["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(pred, run_dir, timeout=120, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = pred(_events(run_dir))
        if hit:
            return hit
        time.sleep(poll)
    raise AssertionError(f"timed out; events: {[e['event'] for e in _events(run_dir)]}")


def _kill_after_commit_and_rerun(args, run_dir, step):
    """Start the job, SIGKILL all of it once a checkpoint at `step` or later is committed, and
    run the same command again; returns the rerun (it must have succeeded)."""
    proc = _start(args + [f"run.dir={run_dir}"])
    try:
        _wait_for(lambda ev: [e for e in ev if e["event"] == "checkpoint_committed"
                              and e["step"] >= step], run_dir)
    finally:
        _kill_job(proc, run_dir)
    assert not os.path.exists(run_dir / "summary.json"), "killed before the end"
    rerun = run_cli(["run", *args, f"run.dir={run_dir}"])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    return rerun


def test_sigkill_whole_job_then_rerun_resumes_to_identical_weights(tmp_path):
    args = [CONFIG, NO_CHAOS, "train.steps=300", "checkpoint.interval_steps=50"]
    run_dir = tmp_path / "killed run"
    rerun = _kill_after_commit_and_rerun(args, run_dir, 100)
    assert "resuming from checkpoint step" in rerun.stdout
    events = _events(run_dir)
    assert [e["event"] for e in events].count("job_start") == 2, "events.jsonl is appended"
    formed = [e for e in events if e["event"] == "group_formed"]
    assert formed[-1]["source"] == "checkpoint" and formed[-1]["step"] >= 100
    # the reference: plain torch DDP on 4 processes (the same run as the CLI's, test_e2e)
    state, _ = run_world(4, "ddp", steps=300, gbs=16)
    assert _summary(run_dir)["weights_digest"] == weights_digest(state)
    assert _summary(run_dir)["steps"] == 300

    # torch's own tool reads a checkpoint written by 4 DDP ranks (replicated tensors split).
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = str(tmp_path / "full.pt")
    dcp_to_torch_save(str(run_dir / "checkpoints" / "step-00000300"), out)
    full = torch.load(out, weights_only=True)
    assert full["model"]["tok.weight"].shape == (64, 64) and int(full["extra"]["step"]) == 300
    assert all(f"rng/rank{r}" in full for r in range(4))

    # The same command again has nothing to train: said at once, Ray not started.
    starts = [e["event"] for e in _events(run_dir)].count("job_start")
    again = run_cli(["run", *args, f"run.dir={run_dir}"], timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished: step 300 of train.steps=300 is committed" in again.stdout
    assert "raise train.steps" in again.stdout and "Traceback" not in again.stderr
    assert [e["event"] for e in _events(run_dir)].count("job_start") == starts

    # A rerun with more steps continues from the final checkpoint.
    more = run_cli(["run", CONFIG, NO_CHAOS, "train.steps=340", "checkpoint.interval_steps=50",
                    f"run.dir={run_dir}"])
    assert more.returncode == 0, more.stdout + more.stderr
    s = _summary(run_dir)
    assert s["steps"] == 340 and s["resumed_from_step"] == 300
    infos = mf.list_checkpoints(str(run_dir / "checkpoints"), {}, verify=True)
    assert all(ci.status == "committed" for ci in infos) and infos[-1].step == 340
    assert len(infos) <= 3 + 1, "retention keeps checkpoint.keep (+ the one resumed from)"


def test_worker_killed_during_persist_leaves_no_manifest(tmp_path):
    """(e) A big model (~130 MB of state) so that persisting takes a while; SIGKILL one worker from
    outside while a step directory has shards but no manifest. That step is never committed, and
    the job recovers and trains on. Also: under DDP each rank writes about half of the bytes (the
    big matrices are split)."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    args = [CONFIG, NO_CHAOS, "train.task=train.tasks.mlp:MLPRegression",
            "train.task_args={hidden: 4096}", "train.steps=60", "checkpoint.interval_steps=5",
            "scaling.max_workers=2", "checkpoint.keep=20", f"run.dir={run_dir}"]
    proc = _start(args)
    victim_step = None
    try:
        _wait_for(lambda ev: [e for e in ev if e["event"] == "checkpoint_committed"], run_dir)
        deadline = time.monotonic() + 120
        while victim_step is None and time.monotonic() < deadline:
            for step in mf.list_steps(str(ckpt), {}):
                d = ckpt / mf.step_name(step)
                try:
                    names = os.listdir(d)
                except FileNotFoundError:
                    continue
                if "manifest.json" not in names and any(n.endswith(".distcp") for n in names):
                    victim_step = step
                    break
            else:
                time.sleep(0.005)
        assert victim_step is not None, "never caught a save in flight"
        pid = next(e["pid"] for e in _events(run_dir)
                   if e["event"] == "worker_start" and e["rank"] == 1)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_job(proc, run_dir)
    # The job recovers (a replacement takes rank 1, state from rank 0); the torn step is never
    # committed, and training goes on past it.
    assert proc.returncode == 0, out
    assert not (ckpt / mf.step_name(victim_step) / "manifest.json").exists()
    events = _events(run_dir)
    committed = [e["step"] for e in events if e["event"] == "checkpoint_committed"]
    assert victim_step not in committed and max(committed) == 60
    (rec,) = [e for e in events if e["event"] == "recovered"]
    assert rec["source"] == "peer" and rec["lost_steps"] == 0
    infos = {c.step: c.status for c in mf.list_checkpoints(str(ckpt), {})}
    assert infos.get(victim_step, "incomplete") == "incomplete"
    # Sharded writes: each rank's files hold about half of the ~135 MB.
    (ci, *_) = [c for c in mf.list_checkpoints(str(ckpt), {}) if c.status == "committed"]
    per_rank = [sum(f["size"] for n, f in ci.manifest["files"].items()
                    if n.startswith(f"__{r}_")) for r in (0, 1)]
    assert ci.bytes > 100e6 and max(per_rank) / min(per_rank) < 1.2, per_rank


def test_the_token_corpus_resumes_bit_identical_after_a_whole_job_sigkill(tmp_path):
    """train.tasks.tokens on a corpus made from the repo's docs: the whole job is SIGKILLed after
    a checkpoint, and the rerun ends with the weights and held-out loss of an uninterrupted run."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from prepare_tokens import prepare

    corpus = str(tmp_path / "docs.bin")
    docs = sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                  if f.endswith(".md"))  # the text, as `make run-tokens` takes it
    assert prepare(corpus, [os.path.join(ROOT, "README.md"), *docs], progress=None) > 50_000
    args = [CONFIG, NO_CHAOS, "train.task=train.tasks.tokens:TokenCorpus",
            f"train.task_args={{path: {corpus}, seq_len: 32, dim: 32, heads: 4}}",
            "train.steps=120", "checkpoint.interval_steps=30", "train.eval_interval_steps=40",
            "train.eval_samples=16"]
    run_dir = tmp_path / "killed"
    rerun = _kill_after_commit_and_rerun(args, run_dir, 60)
    formed = [e for e in _events(run_dir) if e["event"] == "group_formed"]
    assert formed[-1]["source"] == "checkpoint" and formed[-1]["step"] >= 60
    # the uninterrupted run: plain torch processes, the same task, batch and steps
    from dist_harness import run_world
    from train.state import weights_digest

    evals = []
    state, losses = run_world(4, "ddp", steps=120, task="train.tasks.tokens:TokenCorpus",
                              task_args={"path": corpus, "seq_len": 32, "dim": 32, "heads": 4},
                              gbs=16, evaluate=(40, 16), evals=evals)
    got = _summary(run_dir)
    assert got["steps"] == 120 and got["weights_digest"] == weights_digest(state)
    assert got["final_eval_loss"] == pytest.approx(evals[-1], rel=1e-6)
    assert losses[-1] < 5.45, "it learned: ln 256 = 5.55 is where a byte model starts"
