"""Checkpoints on a real S3 endpoint (moto's server on 127.0.0.1): round trip with multipart
shards, inspect, resume; and an outage in the middle of a run."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import NO_CHAOS, ROOT, free_port, run_cli
from conftest import run_events as _events, run_summary as _summary

pytestmark = [pytest.mark.s3, pytest.mark.timeout(420)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")
BUCKET = "ckpt-bucket"


class MotoS3:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_ENDPOINT_URL": self.url}
        self.proc = None

    def start(self):
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("moto_server did not come up")
                time.sleep(0.2)
        # moto keeps everything in memory: a (re)started server needs its bucket again.
        req = urllib.request.Request(f"{self.url}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=10)

    def freeze(self):
        """SIGSTOP the server: it stops answering without refusing (the kernel still accepts
        connections and buffers requests), as a hung endpoint does."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()  # a stopped process would take the SIGKILL only once continued anyway
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def s3():
    server = MotoS3()
    server.start()
    yield server
    server.kill()


def test_s3_round_trip_multipart_inspect_resume(s3, tmp_path):
    uri = f"s3://{BUCKET}/run one"
    # 5 MiB parts: the ~8.5 MB shards of this model go up as multipart uploads.
    args = ["run", CONFIG, NO_CHAOS, "train.task=train.tasks.mlp:MLPRegression",
            "train.task_args={hidden: 2048}", "scaling.max_workers=2", "train.steps=20",
            "checkpoint.interval_steps=10", f"checkpoint.uri={uri}",
            "checkpoint.storage_options={default_block_size: 5242880}",
            f"run.dir={tmp_path / 'run'}"]
    first = run_cli(args, env=s3.env)
    assert first.returncode == 0, first.stdout + first.stderr
    committed = [e for e in _events(tmp_path / "run") if e["event"] == "checkpoint_committed"]
    assert [e["step"] for e in committed] == [10, 20]
    assert committed[-1]["uri"] == f"{uri}/step-00000020" and committed[-1]["bytes"] > 30e6

    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.url}, key="testing",
                           secret="testing")
    sizes = [f["size"] for f in fs.ls(f"{BUCKET}/run one/step-00000020", detail=True)]
    assert max(sizes) > 8 * 2**20, sizes

    inspect = run_cli(["inspect", uri, "--verify"], env=s3.env)
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    assert inspect.stdout.count("committed") >= 2

    # A flipped byte in S3 is caught by --verify.
    key = f"{BUCKET}/run one/step-00000020/__0_0.distcp"
    data = bytearray(fs.cat_file(key))
    data[1000] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    bad = run_cli(["inspect", uri, "--verify"], env=s3.env)
    assert bad.returncode == 1 and "corrupt" in bad.stdout

    # Resume from S3 with more steps: the corrupt step 20 is skipped, step 10 is loaded.
    more = run_cli([a if a != "train.steps=20" else "train.steps=30" for a in args], env=s3.env)
    assert more.returncode == 0, more.stdout + more.stderr
    formed = [e for e in _events(tmp_path / "run") if e["event"] == "group_formed"][-1]
    assert formed["source"] == "checkpoint" and formed["step"] == 10
    assert "checkpoint step 20" in more.stdout and "fails its crc32c check" in more.stdout


def test_s3_outage_training_goes_on_and_later_saves_commit(s3, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, **s3.env)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "run", CONFIG, NO_CHAOS, "train.steps=100000",
         "checkpoint.interval_steps=100", f"checkpoint.uri=s3://{BUCKET}/outage",
         "checkpoint.persist_timeout_s=15",  # above a refused write's 6-11 s (s3-ci.md)
         f"run.dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_event(pred, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [e for e in _events(run_dir) if pred(e)]
            if hits:
                return hits[0]
            time.sleep(0.2)
        raise AssertionError(f"timed out: {[e['event'] for e in _events(run_dir)]}")

    try:
        wait_event(lambda e: e["event"] == "checkpoint_committed")
        s3.kill()
        t_dead = time.time()
        failed = wait_event(lambda e: e["event"] == "checkpoint_failed")
        assert failed["t"] - t_dead < 60, "the outage is bounded in seconds, not minutes"
        assert failed["reason"].startswith("storage endpoint unreachable (EndpointConnectionError")
        s3.start()
        later = wait_event(lambda e: e["event"] == "checkpoint_committed"
                           and e["step"] > failed["step"])
        assert later["step"] > failed["step"]  # training went on through the outage
        # The save due while the failing one still retried waited for it, and said so.
        wait = wait_event(lambda e: e["event"] == "checkpoint_wait")
        assert wait["waited_s"] > 1
        # A server that stops answering without refusing (SIGSTOP) mid-run: the save in flight
        # is given up on every rank after persist_timeout_s, training goes on, and once the
        # server answers again saves commit.
        s3.freeze()
        t_frozen = time.time()
        try:
            frozen = wait_event(lambda e: e["event"] == "checkpoint_failed"
                                and e["t"] > t_frozen and "did not answer" in e["reason"])
            assert frozen["reason"].startswith("storage did not answer within 15 s"), frozen
            assert frozen["t"] - t_frozen < 40, "given up within the bound (plus an interval)"
        finally:
            s3.thaw()
        t_thawed = time.time()
        after = wait_event(lambda e: e["event"] == "checkpoint_committed" and e["t"] > t_thawed)
        assert after["step"] > frozen["step"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # Nothing of the failed step was committed.
    committed = {e["step"] for e in _events(run_dir) if e["event"] == "checkpoint_committed"}
    failed_steps = {e["step"] for e in _events(run_dir) if e["event"] == "checkpoint_failed"}
    assert not committed & failed_steps
    inspect = run_cli(["inspect", f"s3://{BUCKET}/outage", "--verify"], env=s3.env)
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr


@pytest.mark.timeout(180)
def test_a_frozen_endpoint_is_given_up_within_the_bound_and_saves_resume(s3, tmp_path,
                                                                         monkeypatch):
    """One process (a world of 1 on gloo), the real moto server frozen by SIGSTOP while a save
    uploads: the save is given up after checkpoint.persist_timeout_s without an answer, a save
    due meanwhile waits at most that long, and once the server answers again saves commit."""
    import torch
    import torch.distributed as dist

    from coordinator.checkpoint import manifest as mf
    from coordinator.checkpoint.committer import Committer
    from coordinator.checkpoint.saver import CheckpointSaver
    from coordinator.events import EventLog, events_of
    from train.state import build_state, checkpoint_state
    from train.task import make_task

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    uri, opts, timeout = f"s3://{BUCKET}/frozen", {"default_block_size": 5 * 2**20}, 2.0
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        st = build_state(make_task("train.tasks.mlp:MLPRegression", {"hidden": 1024}), "ddp",
                         torch.device("cpu"), 0, 10)
        events = str(tmp_path / "events.jsonl")
        c = Committer(uri, opts, 3, True, "h", EventLog(events))
        group = dist.new_group(backend="gloo")
        saver = CheckpointSaver(uri, opts, True, 0, group, persist_timeout_s=timeout)
        st.step = 1
        saver.save(1, checkpoint_state(st, 0))
        saver.wait()
        c.on_save(saver.reports[-1])
        assert c.committed == [1]
        # Freeze the server once the next save has a file up and more to send.
        st.step = 2
        saver.save(2, checkpoint_state(st, 0))
        deadline = time.monotonic() + 30
        while saver.files_written < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        s3.freeze()
        try:
            t0 = time.monotonic()
            saver.wait()
            gave_up_s = time.monotonic() - t0
            rep = saver.reports[-1]
            assert rep.step == 2 and not rep.ok, rep
            assert rep.error.startswith(f"storage did not answer within {timeout:g} s"), rep.error
            assert gave_up_s < timeout + 3, gave_up_s
            assert saver.given_up == 1 and saver.group is not group  # a fresh checkpoint group
            # Still frozen: the next save is given up too, within the bound.
            st.step = 3
            t0 = time.monotonic()
            saver.save(3, checkpoint_state(st, 0))
            saver.wait()
            assert time.monotonic() - t0 < timeout + 3 and saver.given_up == 2
        finally:
            s3.thaw()
        for step in (4, 5):
            st.step = step
            saver.save(step, checkpoint_state(st, 0))
            saver.wait()
        for rep in list(saver.reports)[1:]:
            c.on_save(rep)
        saver.close()
        assert c.committed == [1, 4, 5] and c.failed == [2, 3]
        failed = events_of(events, "checkpoint_failed")
        assert all("storage did not answer within 2 s" in e["reason"] for e in failed)
        committed = [ci.step for ci in mf.list_checkpoints(uri, opts, verify=True)
                     if ci.status == "committed"]
        assert committed == [1, 4, 5]
    finally:
        dist.destroy_process_group()


def test_a_token_corpus_in_s3_trains_as_its_local_copy(s3, tmp_path):
    """prepare_tokens writes the corpus straight to S3, and a job whose workers read their windows
    from there (ranged GETs) ends with the weights of the same training on a local copy."""
    readme = os.path.join(ROOT, "README.md")
    uri, local = f"s3://{BUCKET}/corpora/readme.bin", str(tmp_path / "readme.bin")
    script = os.path.join(ROOT, "scripts", "prepare_tokens.py")
    env = dict(os.environ, **s3.env)
    for out in (uri, local):
        made = subprocess.run([sys.executable, script, out, readme], env=env, timeout=120,
                              capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
    run = run_cli(["run", CONFIG, NO_CHAOS, "scaling.max_workers=2", "train.steps=12",
                   "train.task=train.tasks.tokens:TokenCorpus",
                   f"train.task_args={{path: '{uri}', seq_len: 32, dim: 32}}",
                   "train.eval_interval_steps=6", "train.eval_samples=8",
                   f"run.dir={tmp_path / 'run'}"], env=s3.env)
    assert run.returncode == 0, run.stdout + run.stderr
    s = _summary(tmp_path / "run")
    assert s["world_sizes"] == [2] and s["final_eval_loss"] is not None
    from dist_harness import run_world
    from train.state import weights_digest

    state, _ = run_world(2, "ddp", steps=12, task="train.tasks.tokens:TokenCorpus",
                         task_args={"path": local, "seq_len": 32, "dim": 32}, gbs=16)
    assert s["weights_digest"] == weights_digest(state)
