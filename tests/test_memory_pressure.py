"""A worker killed by Ray's memory monitor: named as such in one line, and its node gets no new
worker while the pressure lasts (workers/memory_pressure.py)."""

import pytest

from coordinator.control.failure_policy import describe
from coordinator.protocol import FailureKind, WorkerFailure
from coordinator.workers.memory_pressure import MemoryPressure, memory_kill


# the text of the ActorDiedError Ray 2.60 raises for an actor its memory monitor killed
RAY_OOM = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: TrainWorker\n\t"
    "actor_id: 5f3c\n\tpid: 4711\n\tip: 10.0.0.2\nThe actor is dead because its worker process "
    "has died. Worker exit type: NODE_OUT_OF_MEMORY Worker exit detail: Task was killed due to "
    "the node running low on memory.\nMemory on the node (IP: 10.0.0.2, ID: 6835ecfa) was "
    "22.93GB used / 24.00GB limit (0.955388), which exceeds the memory usage threshold of 0.95. "
    "Ray killed this worker (ID: 9a1b) because it was the most recently scheduled task")


@pytest.mark.unit
def test_ray_memory_kill_is_named_with_the_nodes_usage_and_other_deaths_are_not():
    assert memory_kill(RAY_OOM) == "killed by Ray's memory monitor: node at 96% memory"
    older = RAY_OOM.replace("22.93GB used / 24.00GB limit", "22.93 / 24.00 GB")
    assert memory_kill(older) == "killed by Ray's memory monitor: node at 96% memory"
    assert memory_kill("Worker exit type: NODE_OUT_OF_MEMORY") == \
        "killed by Ray's memory monitor: node short of memory"
    assert memory_kill("The actor died unexpectedly before finishing this task.") is None
    assert memory_kill("worker exit: SIGKILL; the memory was fine") is None
    f = WorkerFailure(2, FailureKind.PROCESS_EXIT, 4711, memory_kill(RAY_OOM))
    assert describe(FailureKind.PROCESS_EXIT, [f]) == \
        "worker 2 killed by Ray's memory monitor: node at 96% memory (pid 4711)"
    plain = WorkerFailure(1, FailureKind.PROCESS_EXIT, 99, "The actor died unexpectedly")
    assert describe(FailureKind.PROCESS_EXIT, [plain]) == "worker 1 lost (process exit, pid 99)"


@pytest.mark.unit
def test_a_node_short_of_memory_takes_no_worker_until_its_hold_passes():
    now = [100.0]
    p = MemoryPressure(300.0, clock=lambda: now[0])
    assert p.nodes() == []
    p.killed_on("node-a")
    p.killed_on(None)  # a worker whose node is unknown: nothing to hold
    assert p.nodes() == ["node-a"]
    now[0] += 200
    p.killed_on("node-a")  # killed again: the hold starts over
    now[0] += 250
    assert p.nodes() == ["node-a"]
    now[0] += 51
    assert p.nodes() == []
    off = MemoryPressure(0.0, clock=lambda: now[0])  # failure.memory_pressure_s=0: off
    off.killed_on("node-b")
    assert off.nodes() == []


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_worker_killed_by_rays_memory_monitor_is_named_and_gets_no_replacement(tmp_path):
    """Ray's real memory monitor, with its threshold set 6 GB above what this machine uses
    now (the job itself takes part of it: Ray counts more than MemAvailable says): rank 1 fills
    the node's memory past it (chaos hog_memory), the monitor kills a worker, the job says so in
    one line, places no new worker on the node (failure.memory_pressure_s),
    re-forms with the survivors from their memory, and finishes."""
    import os

    from conftest import NO_CHAOS, ROOT, run_cli, run_events, run_summary
    from coordinator.procmem import _meminfo

    info = _meminfo()
    free = info["MemAvailable"]
    if free < 12 << 30:
        pytest.skip(f"needs 12 GB free to push the node past a threshold safely "
                    f"({free >> 20} MB)")
    used = 1 - free / info["MemTotal"]
    threshold = round(used + (6 << 30) / info["MemTotal"], 3)
    # one worker a kill (Ray's legacy policy): since 2.56 the monitor may kill several at once
    # (seen: both members of a 2-worker job; a job left with none waits, its node held)
    env = dict(os.environ, RAY_memory_usage_threshold=str(threshold),
               RAY_memory_monitor_refresh_ms="100", RAY_worker_killing_policy_by_group="true")
    run_dir = tmp_path / "run"
    proc = run_cli(["run", os.path.join(ROOT, "configs", "local_cpu.yaml"), NO_CHAOS,
                    "ray.simulated_nodes=0", "scaling.min_workers=1", "scaling.max_workers=3",
                    "scaling.spare_workers=0", "train.steps=1200", "checkpoint.interval_steps=0",
                    f"run.dir={run_dir}",
                    "chaos.events=[{at_step: 40, action: hog_memory, target: 1, seconds: 90}]"],
                   cwd=str(tmp_path), timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    events = run_events(run_dir)
    oom = [e for e in events if e["event"] == "failure_detected"
           and e.get("error", "").startswith("killed by Ray's memory monitor")]
    assert oom, [e for e in events if e["event"] == "failure_detected"]
    assert "killed by Ray's memory monitor: node at" in proc.stdout
    assert "is short of memory: no new worker is placed on it" in proc.stdout
    t_kill = oom[0]["t"]
    assert not [e for e in events if e["event"] == "worker_start" and e["t"] > t_kill], \
        "a worker was placed into the memory pressure"
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 1200 and s["world_sizes"][-1] < 3
    assert s["lost_steps"] == 0


@pytest.mark.unit
def test_the_error_ray_raises_for_a_task_of_a_worker_it_killed_names_the_node_usage():
    """Ray raises OutOfMemoryError (not an actor error) for the task a killed worker was
    running; its text has the node's usage in another form."""
    text = ("OutOfMemoryError: 4 worker(s) were killed due to the node running low on memory. "
            "Memory on the node (IP: 192.0.2.2, ID: d393f92b) was 6.16GB used / 23.54GB limit "
            "(0.261757)\nOOM kill reason: Memory usage 6599708672B exceeded threshold")
    assert memory_kill(text) == "killed by Ray's memory monitor: node at 26% memory"
