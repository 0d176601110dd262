"""The generation fence (coordinator/checkpoint/fence.py) against the driver's real TCPStore,
and a save really paused mid-write while the job moves on to a later generation."""

import os
import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from conftest import free_port
from coordinator.checkpoint.fence import KEY, GenerationFence, StaleGeneration
from coordinator.checkpoint.saver import CheckpointSaver
from test_checkpoint import _trained
from train.state import checkpoint_state

pytestmark = pytest.mark.unit


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=10))
    yield s


def test_the_fence_lets_the_current_generation_write_and_stops_older_ones(store):
    store.set(KEY, "3")
    fence = GenerationFence("127.0.0.1", store.port, 3, every_s=0.0)
    fence.check()
    store.set(KEY, "4")
    with pytest.raises(StaleGeneration, match="generation 3 is over .*generation 4"):
        fence.check()
    GenerationFence("127.0.0.1", store.port, 4).check()


def test_no_store_to_ask_means_no_write():
    fence = GenerationFence("127.0.0.1", free_port(), 1, timeout_s=1.0)
    with pytest.raises(StaleGeneration, match="cannot confirm generation 1 is current"):
        fence.check()


def test_a_save_paused_while_the_job_moves_on_writes_nothing_more(store, world1, tmp_path):
    """The persist thread is held before its second file (as a frozen node holds it); meanwhile
    the driver starts generation 2. Released, the stale save stops at its next write: it reports
    failure with the reason, and no file of it appears after the release."""
    store.set(KEY, "1")
    fence = GenerationFence("127.0.0.1", store.port, 1, every_s=0.0)
    gate, held = threading.Event(), threading.Event()
    writes = []

    def fault_point():
        writes.append(len(writes))
        if len(writes) == 2:  # the second write: freeze here
            held.set()
            gate.wait(30)
        fence.check()

    _, st = _trained(2)
    uri = str(tmp_path / "ckpt")
    saver = CheckpointSaver(uri, {}, True, 0, world1, retries=1, fault=fault_point)
    saver.save(2, checkpoint_state(st, 0))
    assert held.wait(30)
    step_dir = tmp_path / "ckpt" / "step-00000002"
    before = sorted(os.listdir(step_dir)) if step_dir.exists() else []
    store.set(KEY, "2")  # the job moved on while this save was frozen
    gate.set()
    saver.close()
    (rep,) = saver.reports
    assert not rep.ok and "generation 1 is over" in rep.error
    after = sorted(os.listdir(step_dir)) if step_dir.exists() else []
    assert set(after) <= set(before) | {n + ".tmp" for n in before}, (before, after)
    assert ".metadata" not in after and "manifest.json" not in after
