"""A worker lost at any moment of a generation's life is survived, bit-identical.

The fault is injected from the test side, by the task itself (no production code path knows of
it): rank 1's process SIGKILLs itself once per job at the named moment: inside its first step
(the generation has just formed), inside the last step, or while the final digest is taken. (A
DDP join runs none of the task's code: its model was built when the worker started, and the
bucket layout is set without a forward pass.) A replacement takes rank 1 and the final weights
equal plain torch DDP's on 4 processes.
"""

import os

import pytest

from conftest import NO_CHAOS, ROOT, cli_process, run_cli
from conftest import run_events as _events, run_summary as _summary
from dist_harness import run_world
from coordinator.config import FailureConfig
from train.state import weights_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")
STEPS = 30

KILLER_TASK = """
import os
import signal

import torch.distributed as dist

from train.tasks.gpt import TinyGPT


class Killer(TinyGPT):
    \"\"\"TinyGPT whose rank `rank` SIGKILLs its own process once per job (`marker` says it
    happened), at the moment `at` names.\"\"\"

    def __init__(self, at, rank, marker, last_call, **kw):
        super().__init__(**kw)
        self.at, self.rank, self.marker, self.last_call = at, rank, marker, last_call
        self.calls = 0

    def _die(self):
        if not dist.is_initialized() or dist.get_rank() != self.rank:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # once per job: the replacement trains on
        os.kill(os.getpid(), signal.SIGKILL)

    def build_model(self):
        model = super().build_model()
        if self.at == "digest":  # the final digest is the first full state dict taken
            model.register_state_dict_pre_hook(lambda *args, **kwargs: self._die())
        return model

    def loss(self, model, batch):
        self.calls += 1  # call k: step k
        if (self.at, self.calls) in (("first_step", 1), ("last_step", self.last_call)):
            self._die()
        return super().loss(model, batch)
"""


@pytest.fixture(scope="module")
def reference():
    state, _ = run_world(4, "ddp", steps=STEPS, gbs=16)
    return weights_digest(state)


@pytest.mark.parametrize("at", ["first_step", "last_step", "digest"])
def test_a_worker_killed_at_any_moment_is_replaced_bit_identical(tmp_path, reference, at):
    (tmp_path / "killer.py").write_text(KILLER_TASK)
    marker = tmp_path / "killed"
    args = {"at": at, "rank": 1, "marker": str(marker), "last_call": STEPS}
    task_args = "{" + ", ".join(f"{k}: {v!r}" if isinstance(v, int) else f"{k}: '{v}'"
                                for k, v in args.items()) + "}"
    run_dir = tmp_path / "run"
    proc = run_cli(["run", CONFIG, NO_CHAOS, "train.task=killer:Killer",
                    f"train.task_args={task_args}", f"train.steps={STEPS}",
                    "train.global_batch_size=16", "checkpoint.interval_steps=0",
                    f"run.dir={run_dir}"], cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marker.exists(), "the fault fired"
    failures = [e for e in _events(run_dir) if e["event"] == "failure_detected"]
    assert [(f["kind"], f["ranks"]) for f in failures] == [("process_exit", [1])], failures
    (rec,) = [e for e in _events(run_dir) if e["event"] == "recovered"]
    assert rec["lost_steps"] == 0 and rec["world_size"] == 4
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == STEPS and s["recoveries"] == 1
    assert s["weights_digest"] == reference, "bit-identical to the failure-free run"
    assert "Traceback" not in proc.stdout, "a recovery prints our lines, not tracebacks"


SLOW_TASK = """
import time

from train.tasks.gpt import TinyGPT


class Slow(TinyGPT):
    def build_model(self):  # a model that takes long to build: the generation forms slowly
        time.sleep(120)
        return super().build_model()
"""


def test_a_preemption_notice_during_a_slow_formation_stops_the_job_at_once(tmp_path):
    """The controller never waits on the workers: SIGUSR1 while the first generation forms (its
    models take two minutes to build) stops the job within seconds, exit 130, nothing left."""
    import signal
    import time

    (tmp_path / "slow.py").write_text(SLOW_TASK)
    run_dir = tmp_path / "run"
    with cli_process(["run", CONFIG, NO_CHAOS, "train.task=slow:Slow", "ray.simulated_nodes=0",
                      "scaling.max_workers=2", f"run.dir={run_dir}"], cwd=tmp_path,
                     pythonpath=[tmp_path]) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                e["event"] == "group_forming" for e in _events(run_dir)):
            time.sleep(0.2)
        assert any(e["event"] == "group_forming" for e in _events(run_dir)), "never formed"
        time.sleep(2.0)  # the members are building their models now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    assert proc.returncode == 130, out
    assert took < 20, f"the notice waited {took:.1f}s behind the formation"  # a bound, not a goal
    s = _summary(run_dir)
    assert s["status"] == "interrupted" and "SIGUSR1" in s["error"]
    assert "while forming a generation" in s["error"]
    ends = [e for e in _events(run_dir) if e["event"] == "job_end"]
    assert ends[-1]["status"] == "interrupted"


def test_a_one_worker_job_frozen_is_found_without_a_peer_and_resumes_bit_identical(tmp_path):
    """No peer to compare with: the only worker is SIGSTOPped. Its silence and the steps that
    stopped completing name it hung within failure.hang_timeout_s plus a poll; it is killed,
    replaced, and the job resumes from the last committed checkpoint to the weights of an
    uninterrupted one-worker run."""
    import signal
    import time

    steps, run_dir = 400, tmp_path / "run"
    with cli_process(["run", CONFIG, NO_CHAOS, "ray.simulated_nodes=0", "scaling.min_workers=1",
                      "scaling.max_workers=1", f"train.steps={steps}",
                      "train.global_batch_size=16", "checkpoint.interval_steps=50",
                      f"run.dir={run_dir}"]) as proc:  # failure.hang_timeout_s: the default
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                e["event"] == "checkpoint_committed" for e in _events(run_dir)):
            time.sleep(0.1)
        (worker,) = [e for e in _events(run_dir) if e["event"] == "worker_start"]
        t_fault = time.time()
        os.kill(worker["pid"], signal.SIGSTOP)
        out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out
    (f,) = [e for e in _events(run_dir) if e["event"] == "failure_detected"]
    assert f["kind"] == "hang" and f["ranks"] == [0] and f["pids"] == [worker["pid"]]
    limit = FailureConfig().hang_timeout_s
    assert f["t"] - t_fault < limit + 3, "detected within failure.hang_timeout_s and a poll"
    (rec,) = [e for e in _events(run_dir) if e["event"] == "recovered"]
    assert rec["source"] == "checkpoint" and rec["world_size"] == 1
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == steps and s["recoveries"] == 1
    state, _ = run_world(1, "ddp", steps=steps, gbs=16)
    assert s["weights_digest"] == weights_digest(state), "bit-identical to the uninterrupted run"
    assert "nor did any peer" in out


LONG_STEP_TASK = """
import time

import torch.distributed as dist

from train.tasks.gpt import TinyGPT


class LongStep(TinyGPT):
    \"\"\"TinyGPT whose rank 0 spends `seconds` in a GIL-bound Python loop inside step `step`
    (a slow data pipeline or a big model's step); the other ranks wait for it in the gradient
    all-reduce (a slow collective).\"\"\"

    def __init__(self, step, seconds, **kw):
        super().__init__(**kw)
        self.step, self.seconds, self.calls = step, seconds, 0

    def loss(self, model, batch):
        self.calls += 1  # call k: step k
        if self.calls == self.step and dist.get_rank() == 0:
            end = time.time() + self.seconds
            while time.time() < end:
                pass
        return super().loss(model, batch)
"""


def test_a_step_5x_the_hang_timeout_is_never_called_a_hang_with_the_default(tmp_path):
    """With the default failure.hang_timeout_s (3 s: a frozen worker is found in seconds), a
    step that legitimately takes 15 s is not a hang: rank 0 holds the GIL in a Python loop for
    15 s inside step 3 while rank 1 waits in the all-reduce, and both keep answering heartbeats
    from their control threads. No failure is detected and the job finishes."""
    (tmp_path / "long_step.py").write_text(LONG_STEP_TASK)
    run_dir = tmp_path / "run"
    proc = run_cli(["run", CONFIG, NO_CHAOS, "train.task=long_step:LongStep",
                    "train.task_args={step: 3, seconds: 15}", "ray.simulated_nodes=0",
                    "scaling.min_workers=2", "scaling.max_workers=2", "train.steps=8",
                    "train.global_batch_size=16", "checkpoint.interval_steps=0",
                    f"run.dir={run_dir}"], cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = _events(run_dir)
    assert not [e for e in events if e["event"] == "failure_detected"], proc.stdout
    start = next(e["t"] for e in events if e["event"] == "group_formed")
    end = next(e["t"] for e in events if e["event"] == "job_end")
    assert end - start >= 15, "the long step happened"
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 8 and s["failures"] == 0
