"""Data slicing: the same global batch, and the same gradient, at any world size."""

import pytest
import torch

from train import data as data_lib
from train.tasks.gpt import TinyGPT
from train.tasks.mlp import MLPRegression

pytestmark = pytest.mark.unit


# world > gbs is rejected by the config (train.global_batch_size >= scaling.max_workers).
@pytest.mark.parametrize("gbs, world", [(g, w) for g in (1, 4, 7, 16, 33) for w in (1, 2, 3, 4, 5)
                                        if w <= g])
def test_slices_partition_the_global_batch(gbs, world):
    seen = []
    sizes = []
    for rank in range(world):
        start, stop = data_lib.rank_slice(gbs, world, rank)
        seen.extend(range(start, stop))
        sizes.append(stop - start)
    assert seen == list(range(gbs)), "contiguous, disjoint, complete, in rank order"
    assert max(sizes) - min(sizes) <= 1
    assert sum(data_lib.share(gbs, world, r) for r in range(world)) == pytest.approx(1.0)
    assert sum(data_lib.loss_scale(gbs, world, r) for r in range(world)) == pytest.approx(world)


def test_samples_depend_only_on_seed_and_index():
    t = TinyGPT()
    a, b = t.sample(41, seed=3), t.sample(41, seed=3)
    assert torch.equal(a["tokens"], b["tokens"])
    assert not torch.equal(t.sample(41, seed=3)["tokens"], t.sample(42, seed=3)["tokens"])
    assert not torch.equal(t.sample(41, seed=3)["tokens"], t.sample(41, seed=4)["tokens"])
    # Rank slices of step 5 at world 3 are exactly the global batch of step 5.
    full = data_lib.local_batch(t, 0, 5, 12, 1, 0)["tokens"]
    parts = torch.cat([data_lib.local_batch(t, 0, 5, 12, 3, r)["tokens"] for r in range(3)])
    assert torch.equal(full, parts)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("task", [TinyGPT(), MLPRegression()], ids=["gpt", "mlp"])
def test_weighted_gradient_is_world_size_invariant(task):
    """What DDP computes (the average over ranks of grad(scale_r * loss_r)) equals the full-batch
    gradient for world 1, 2, 3, 4, with uneven slices (gbs 10)."""
    gbs, step, seed = 10, 2, 7
    torch.manual_seed(0)
    model = task.build_model()
    reference = None
    for world in (1, 2, 3, 4):
        total = None
        for rank in range(world):
            model.zero_grad()
            batch = data_lib.local_batch(task, seed, step, gbs, world, rank)
            (task.loss(model, batch) * data_lib.loss_scale(gbs, world, rank)).backward()
            total = _grads(model) if total is None else total + _grads(model)
        avg = total / world
        if reference is None:
            reference = avg
        torch.testing.assert_close(avg, reference, rtol=1e-5, atol=1e-6)


def test_gpt_loss_falls():
    task = TinyGPT()
    torch.manual_seed(0)
    model = task.build_model()
    opt = task.build_optimizer(model)
    sched = task.build_scheduler(opt, 120)
    losses = []
    for step in range(120):
        batch = data_lib.local_batch(task, 0, step, 16, 1, 0)
        opt.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # ~ln(64): untrained
    assert sum(losses[-10:]) / 10 < 1.5, losses[-10:]  # approaching ln(2) = 0.69
