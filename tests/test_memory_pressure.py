"""A worker killed by Ray's memory monitor: named as such in one line, and its node gets no new
worker while the pressure lasts (workers/memory_pressure.py). The texts are Ray 2.60's own, taken
from its monitor killing our workers for real (chaos hog_memory with RAY_memory_usage_threshold
set low); an end-to-end test of that was not kept: the monitor killed every worker of the job
within 0.3 s in 2 of 7 runs, whatever the job's size."""

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


@pytest.mark.unit
def test_the_error_ray_raises_for_a_task_of_a_worker_it_killed_names_the_node_usage():
    """Ray raises OutOfMemoryError (not an actor error) for the task a killed worker was
    running; its text has the node's usage in another form."""
    text = ("OutOfMemoryError: 4 worker(s) were killed due to the node running low on memory. "
            "Memory on the node (IP: 192.0.2.2, ID: d393f92b) was 6.16GB used / 23.54GB limit "
            "(0.261757)\nOOM kill reason: Memory usage 6599708672B exceeded threshold")
    assert memory_kill(text) == "killed by Ray's memory monitor: node at 26% memory"
