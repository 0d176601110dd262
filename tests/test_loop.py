"""The rank loop (train.loop) in one process, without a process group: the hook's contract, the
errors, and equality with the step typed out by hand."""

import pytest
import torch

from train import data as data_lib
from train.errors import short_error
from train.loop import StepError, run_steps
from train.state import build_state, full_model_state, weights_digest
from train.step import train_step
from train.task import make_task

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


def _state(seed=0):
    task = make_task("train.tasks.gpt:TinyGPT", {})
    return build_state(task, "ddp", CPU, seed, 100, wrap_ddp=False)


def _loop(st, until, **kw):
    run_steps(st, seed=3, global_batch_size=10, world_size=3, rank=2, device=CPU,
              until_step=until, **kw)


def test_the_loop_is_the_step_typed_out():
    """Rank 2 of 3 (a short slice): the loop's weights and weighted losses are those of
    train_step on the same slices with the same weighting."""
    st, ref = _state(), _state()
    calls = []
    _loop(st, 4, after_step=lambda *a: calls.append(a) and False)
    scale, share = data_lib.loss_scale(10, 3, 2), data_lib.share(10, 3, 2)
    losses = []
    for step in range(4):
        batch = data_lib.local_batch(ref.task, 3, step, 10, 3, 2)
        losses.append(train_step(ref.model, ref.optimizer, ref.scheduler, ref.task.loss, batch,
                                 scale).loss * share)
    assert st.step == 4
    assert weights_digest(full_model_state(st)) == weights_digest(full_model_state(ref))
    assert [c[0] for c in calls] == [1, 2, 3, 4] and [c[1] for c in calls] == losses
    assert all(c[3] >= 0 and c[2] >= c[3] for c in calls)


def test_the_hook_stops_the_loop_and_its_errors_pass_unchanged():
    st = _state()
    _loop(st, 10, after_step=lambda step, *a: step == 2)
    assert st.step == 2
    _loop(st, 2)  # already there: no step
    assert st.step == 2

    def broken(step, *a):
        raise KeyError("the hook's own")

    with pytest.raises(KeyError):
        _loop(st, 10, after_step=broken)
    assert st.step == 3


def test_a_runtime_error_in_the_step_is_a_step_error():
    st = _state()
    _loop(st, 2)

    def lost_peer(model, batch):
        raise RuntimeError("Connection closed by peer\n  [/pytorch/gloo/transport.cc:123]")

    st.task.loss = lost_peer
    with pytest.raises(StepError) as info:
        _loop(st, 5)
    assert info.value.step == 3 and st.step == 2
    assert short_error(info.value.cause) == ("Connection closed by peer "
                                             "[/pytorch/gloo/transport.cc:123]")
    assert str(info.value).startswith("step 3: Connection closed")


def test_short_error():
    assert short_error(ValueError("a\n  b\tc " + "x" * 400)) == ("a b c " + "x" * 400)[:300]
    assert short_error("  spaced   out ", limit=None) == "spaced out"
    assert short_error(OSError("abcdef"), limit=3) == "abc"


class _Recording:
    """TinyGPT whose samples say which thread built them; sample `fail_at` raises."""

    def __init__(self, fail_at=None):
        import threading
        self._task, self.calls, self.fail_at = make_task("train.tasks.gpt:TinyGPT", {}), [], fail_at
        self._threading = threading

    def sample(self, index, seed):
        self.calls.append((index, self._threading.current_thread().name))
        if index == self.fail_at:
            raise ValueError(f"sample {index} is unreadable")
        return self._task.sample(index, seed)

    def __getattr__(self, name):
        return getattr(self._task, name)


@pytest.mark.parametrize("micro", [None, 2])
def test_prefetch_builds_the_same_batches_one_step_ahead_on_another_thread(micro):
    from train.step import Recipe

    runs = {}
    for prefetch in (False, True):
        st = _state()
        st.recipe = Recipe(micro, "fp32", None)
        st.task = rec = _Recording()
        losses = []
        _loop(st, 5, prefetch=prefetch, after_step=lambda s, l, t, d: losses.append(l) and False)
        runs[prefetch] = (weights_digest(full_model_state(st)), losses, rec.calls)
    assert runs[True][:2] == runs[False][:2], "same weights and losses"
    calls = runs[True][2]
    # rank 2 of 3 with 10 per step: samples 7..9 of each step; nothing past the last step
    assert sorted(i for i, _ in calls) == sorted(i for i, _ in runs[False][2]) == \
        [s * 10 + k for s in range(5) for k in (7, 8, 9)]
    threads = {i // 10: name for i, name in calls}
    assert threads[0] == "MainThread" and all(threads[s].startswith("prefetch")
                                              for s in range(1, 5))
    assert {name for _, name in runs[False][2]} == {"MainThread"}


def test_prefetch_drops_the_batch_of_a_step_that_never_comes_and_raises_at_its_step():
    st = _state()
    st.task = rec = _Recording(fail_at=3 * 10 + 8)  # a sample of step 4 (state.step 3)
    _loop(st, 5, prefetch=True, after_step=lambda s, *a: s == 3)  # stops after step 3
    assert st.step == 3, "the error of a batch built ahead for a step not taken is never read"
    with pytest.raises(ValueError, match="sample 38 is unreadable"):
        _loop(st, 5, prefetch=True)
    assert st.step == 3


def test_the_prefetcher_holds_one_batch_ahead_at_most():
    import threading

    from train.prefetch import Prefetcher

    built, gate = [], threading.Event()

    def build(step):
        built.append(step)
        gate.wait(5)
        return step

    gate.set()
    with Prefetcher(build, until_step=4) as p:
        assert [p.get(s) for s in range(4)] == [0, 1, 2, 3] and p.hits == 3
        assert p.get(1) == 1, "out of order (a rollback): built on the spot"
    assert built.count(1) == 2 and max(built) == 3
