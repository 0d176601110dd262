"""RayWorkerGroup's bookkeeping of starting workers, without a cluster: Ray's calls are replaced
by stand-ins, so each case is exact."""

import time

import pytest

from coordinator.workers import worker_group as wg

pytestmark = pytest.mark.unit


class _Ray:
    """ray.wait stand-in: no starting worker has answered yet."""

    @staticmethod
    def wait(refs, timeout=None):
        return [], list(refs)


def _group(monkeypatch, reachable):
    monkeypatch.setattr(wg, "ray", _Ray)
    monkeypatch.setattr(wg, "node_reachable", lambda node, timeout_s=1.0: reachable[node])
    killed = []
    monkeypatch.setattr(wg.RayWorkerGroup, "_kill", staticmethod(killed.append))
    group = object.__new__(wg.RayWorkerGroup)
    group.start_timeout_s = 60.0
    group._node_checks = {}
    group._ready = []
    now = time.monotonic()
    group._spawning = [wg._Newcomer(f"actor-{n}", f"ref-{n}", n, now) for n in ("a", "b", "a")]
    return group, killed


def test_a_starting_worker_whose_node_is_gone_is_dropped_at_once(monkeypatch):
    """make run once waited failure.replace_timeout_s (30 s) in a node-loss recovery for a spare
    placed on the lost node while Ray still called it alive: it could never start. Such a
    worker is dropped at the next look, not after scaling's start timeout."""
    group, killed = _group(monkeypatch, {"a": False, "b": True})
    assert group.collect_ready() == 0
    assert group.pending() == 1 and [nc.node_id for nc in group._spawning] == ["b"]
    assert killed == ["actor-a", "actor-a"]


def test_starting_workers_on_live_nodes_are_waited_for(monkeypatch):
    group, killed = _group(monkeypatch, {"a": True, "b": True})
    assert group.collect_ready() == 0 and group.pending() == 3 and not killed


def test_a_node_is_asked_at_most_once_a_second(monkeypatch):
    group, _ = _group(monkeypatch, {"a": True, "b": True})
    asked = []
    monkeypatch.setattr(wg, "node_reachable", lambda node, timeout_s=1.0: asked.append(node) or True)
    for _ in range(5):
        group.collect_ready()
    assert sorted(asked) == ["a", "b"]
