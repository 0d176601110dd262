"""End to end on an embedded Ray: the real CLI in a subprocess, as a user runs it."""

import os
import re

import pytest

from conftest import NO_CHAOS, ROOT, run_cli
from conftest import run_events as _events, run_summary as _summary
from dist_harness import run_world
from train.state import weights_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")


def _readme_task() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- user-task -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its user-task example"
    return block.group(1)


def test_two_workers_readme_task_from_a_path_with_spaces(tmp_path):
    """The README's task, in a directory whose name has a space and a quote, on 2 workers of a
    plain embedded Ray."""
    home = tmp_path / "my 'tasks'"
    home.mkdir()
    (home / "my_task.py").write_text(_readme_task())
    run_dir = home / "run dir"
    proc = run_cli(["run", CONFIG, NO_CHAOS, "train.task=my_task:Blobs", "ray.simulated_nodes=0",
                    "scaling.min_workers=2", "scaling.max_workers=2", "train.steps=30",
                    f"run.dir={run_dir}"], cwd=str(home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 30 and s["world_sizes"] == [2]
    assert s["final_loss"] < 0.5, "the blobs are separable: the loss must fall"
    assert "== job local_cpu finished: 30/30 steps" in proc.stdout


BROKEN_TASK = """
from train.tasks.mlp import MLPRegression


class Broken(MLPRegression):
    calls = 0

    def loss(self, model, batch):
        Broken.calls += 1  # calls 1-3 are steps 1-3
        if Broken.calls > 3:
            raise ValueError("labels out of range in my loss")
        return super().loss(model, batch)
"""


def test_an_error_in_the_users_task_fails_the_job_with_its_message(tmp_path):
    (tmp_path / "broken_task.py").write_text(BROKEN_TASK)
    proc = run_cli(["run", CONFIG, NO_CHAOS, "train.task=broken_task:Broken", "ray.simulated_nodes=0",
                    "scaling.max_workers=2", f"run.dir={tmp_path / 'run'}"], cwd=str(tmp_path))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    s = _summary(tmp_path / "run")
    assert s["status"] == "failed" and s["steps"] == 3
    assert "task error: ValueError: labels out of range in my loss" in s["error"]
    assert "labels out of range in my loss" in proc.stdout


def test_four_workers_on_two_simulated_nodes_match_plain_ddp(tmp_path):
    """4 workers spread over 2 simulated nodes; two identical runs end with identical weights, and
    those equal what plain torch DDP on 4 gloo processes computes, bit for bit."""
    digests = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        proc = run_cli(["run", CONFIG, NO_CHAOS, "train.steps=25", "train.global_batch_size=12",
                        f"run.dir={run_dir}"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        s = _summary(run_dir)
        assert s["status"] == "finished" and s["steps"] == 25 and s["world_sizes"] == [4]
        assert s["failures"] == 0 and s["steps_per_s"] > 0
        digests.append(s["weights_digest"])
        events = _events(run_dir)
        names = [e["event"] for e in events]
        assert names[0] == "job_start" and names[-1] == "job_end"
        starts = [e for e in events if e["event"] == "worker_start"]
        assert sorted(e["rank"] for e in starts) == [0, 1, 2, 3]
        assert len({e["node_id"] for e in starts}) == 2, "spread over both simulated nodes"
        assert all(e["pid"] > 0 and e["generation"] == 1 for e in starts)
        formed = next(e for e in events if e["event"] == "group_formed")
        assert formed["world_size"] == 4 and formed["source"] == "init" and formed["step"] == 0
        assert events[-1]["status"] == "finished" and events[-1]["step"] == 25
        assert os.path.exists(run_dir / "config.yaml")
    assert digests[0] == digests[1]
    state, losses = run_world(4, "ddp", steps=25, gbs=12)
    assert weights_digest(state) == digests[0]
    assert _summary(tmp_path / "a")["final_loss"] == pytest.approx(losses[-1], rel=1e-6)


def test_fsdp_three_workers_match_plain_fsdp(tmp_path):
    proc = run_cli(["run", CONFIG, NO_CHAOS, "train.parallelism=fsdp", "scaling.max_workers=3", "train.steps=15",
                    "train.global_batch_size=12", f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = _summary(tmp_path)
    assert s["status"] == "finished" and s["world_sizes"] == [3]
    state, _ = run_world(3, "fsdp", steps=15, gbs=12)
    assert weights_digest(state) == s["weights_digest"]
