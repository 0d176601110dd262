"""The shared fakes cannot drift from the real seams: same methods, same parameters."""

import inspect

import pytest

from coordinator.protocol import WorkerGroup
from fakes import FakeCommitter, FakeGroup

pytestmark = pytest.mark.unit


def _methods(cls):
    return {n: m for n, m in inspect.getmembers(cls, inspect.isfunction)
            if not n.startswith("_")}


def _params(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _conforms(impl, spec_methods):
    got = _methods(impl)
    missing = sorted(set(spec_methods) - set(got))
    assert not missing, f"{impl.__name__} lacks {missing}"
    for name, fn in spec_methods.items():
        assert _params(got[name]) == _params(fn), f"{impl.__name__}.{name}: parameters differ"


def test_fake_group_implements_the_protocol():
    _conforms(FakeGroup, _methods(WorkerGroup))
    assert isinstance(FakeGroup(), WorkerGroup)


def test_ray_group_implements_the_protocol():
    from coordinator.workers.worker_group import RayWorkerGroup

    _conforms(RayWorkerGroup, _methods(WorkerGroup))


def test_fake_committer_has_what_the_controller_uses_of_the_real_one():
    from coordinator.checkpoint.committer import Committer

    used = ("resolve_resume", "latest_step", "end_generation", "on_save", "poll")
    real = {n: getattr(Committer, n) for n in used}
    _conforms(FakeCommitter, real)
    for attr in ("committed", "failed", "protected"):
        assert hasattr(FakeCommitter(0, None), attr)


def test_a_method_missing_from_a_fake_is_caught():
    class Partial(FakeGroup):
        pass

    del_name = "poll_form"
    spec = _methods(WorkerGroup)
    with pytest.raises(AssertionError, match=del_name):
        _conforms(type("Broken", (), {n: f for n, f in _methods(Partial).items()
                                      if n != del_name}), spec)
