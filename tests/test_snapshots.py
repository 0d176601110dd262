"""In-memory shard snapshots (coordinator/workers/snapshots.py) without a process group: the
store, the rows a holder sends, the buddies. Resharding real FSDP2 DTensors is tested end to end
in tests/test_fsdp_memory.py."""

import pytest
import torch

from coordinator.workers import snapshots as sn

pytestmark = pytest.mark.unit


def _snap(step, offset, rows, world=4):
    data = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * offset
    return sn.Snapshot(step, world, entries={"model/w": sn.Rows(offset, data, (10, 2)),
                                     "extra/step": torch.tensor(step),
                                     "optim/param_groups/0/lr": 0.1,
                                     "rng/rank1": torch.tensor([1, 2, 3], dtype=torch.uint8)},
                       nbytes=data.numel() * 4)


def test_a_holder_sends_only_the_overlap_of_the_rows_asked_for():
    snap = _snap(7, offset=3, rows=3)  # rows 3, 4, 5 of 10
    got = sn.pieces(snap, {"model/w": (4, 8)}, shared=False, rng_of=None)
    (rows,) = got.values()
    assert rows.offset == 4 and rows.data.shape == (2, 2)
    assert torch.equal(rows.data, snap.entries["model/w"].data[1:3])
    assert rows.data.untyped_storage().nbytes() == 2 * 2 * 4, "a copy, not a view of all rows"
    assert sn.pieces(snap, {"model/w": (6, 10)}, shared=False, rng_of=None) == {}
    shared = sn.pieces(snap, {}, shared=True, rng_of="rng/rank1")
    assert set(shared) == {"extra/step", "optim/param_groups/0/lr", "rng/rank1"}
    assert "rng/rank1" not in sn.pieces(snap, {}, shared=True, rng_of=None)


def test_the_store_keeps_the_two_newest_steps_per_owner_of_the_newest_generation():
    store = sn.SnapshotStore()
    for step in (5, 6, 7):
        store.put(1, 0, _snap(step, 0, 3))
    store.put(1, 3, _snap(6, 9, 1))
    gen, held, world = store.held()
    assert gen == 1 and held == {0: [6, 7], 3: [6]} and world == 4
    assert store.get(1, 0, 7).step == 7
    with pytest.raises(sn.SnapshotError, match="rank 0 at step 5"):
        store.get(1, 0, 5)
    peak = store.peak_bytes
    assert peak == 2 * (3 * 2 * 4) + 1 * 2 * 4  # two steps of 3 rows, one of 1 row
    store.put(0, 0, _snap(9, 0, 3))  # a late copy from an older generation: ignored
    assert store.held()[1] == {0: [6, 7], 3: [6]}
    store.put(2, 1, _snap(9, 3, 3, world=3))  # a new generation: the old shards go
    assert store.held() == (2, {1: [9]}, 3)
    with pytest.raises(sn.SnapshotError):
        store.get(1, 0, 7)


@pytest.mark.parametrize("nodes, expected", [
    (["a", "b", "a", "b"], {0: 1, 1: 2, 2: 3, 3: 0}),
    (["a", "a", "b", "b"], {0: 2, 1: 3, 2: 0, 3: 1}),
    (["a", "a", "a"], {0: 1, 1: 2, 2: 0}),
    (["a"], {}),
])
def test_buddies_are_on_another_node_and_each_holds_about_one_copy(nodes, expected):
    b = sn.buddies(nodes)
    assert b == expected
    if len(set(nodes)) > 1:
        assert all(nodes[r] != nodes[h] for r, h in b.items())


def test_flatten_and_rebuild_walk_nested_state_dicts():
    sd = {"model": {"w": 1}, "optim": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    flat = sn.flatten(sd)
    assert flat == {"model/w": 1, "optim/param_groups/0/lr": 0.1,
                    "optim/param_groups/0/params/0": "w"}
    assert sn.rebuild(sd, {"model/w": 2}) == {"model": {"w": 2}, "optim": sd["optim"]}


def test_a_snapshot_travels_as_one_block_and_a_json_header():
    sd = {"extra": {"step": torch.tensor(7), "scheduler": torch.tensor([1, 2], dtype=torch.uint8)},
          "optim": {"w": {"exp_avg": torch.randn(3, 5, dtype=torch.bfloat16)},
                    "param_groups": [{"lr": 0.25, "betas": (0.9, 0.95), "foreach": None}]},
          "rng/rank0": torch.arange(5, dtype=torch.uint8)}
    snap = sn.take(sn.flatten(sd), step=7, world_size=4)
    assert snap.buffer.dtype == torch.uint8 and snap.nbytes == snap.buffer.numel()
    sd["optim"]["w"]["exp_avg"].zero_()  # a copy, not a view of the live state
    snap = sn.Snapshot(7, 4, buffer=snap.buffer, header=snap.header)  # parsed afresh
    back = sn.from_frame(bytes(snap.header), snap.buffer.clone(), 7, 4)
    assert back.step == 7 and back.world_size == 4
    assert back.entries["optim/w/exp_avg"].abs().sum() > 0
    for path, e in snap.entries.items():
        got = back.entries[path]
        if isinstance(e, torch.Tensor):
            assert got.dtype == e.dtype and torch.equal(got, e), path
        else:
            assert got == e, path
    assert back.entries["optim/param_groups/0/betas/1"] == 0.95
    rebuilt = sn.rebuild(sd, back.entries)
    assert rebuilt["optim"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_a_plain_tensor_that_changes_size_between_snapshots_keeps_its_bytes():
    """The scheduler's JSON (and so its tensor) grows as its numbers do: each snapshot lays the
    plain tensors out afresh, with the same layout cache."""
    cache = {}
    for text in (b'{"last_epoch": 9}', b'{"last_epoch": 10, "lr": 0.001}'):
        sd = {"extra/scheduler": torch.frombuffer(bytearray(text), dtype=torch.uint8).clone(),
              "extra/step": torch.tensor(3), "v": 1.5}
        snap = sn.take(sd, 3, 2, cache)
        assert snap.nbytes == snap.buffer.numel() == sum(-(-t.numel() * t.element_size() // 16) * 16
                                                         for t in (sd["extra/scheduler"],
                                                                   sd["extra/step"]))
        got = sn.Snapshot(3, 2, buffer=snap.buffer, header=snap.header).entries
        assert bytes(got["extra/scheduler"].tolist()) == text and got["v"] == 1.5


def test_live_leaves_follow_tied_weights_and_live_updates():
    """A language model's tied head and embedding are one parameter under two state-dict
    names; the map follows both, and reads what a step changed in place."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3)
            self.head = nn.Linear(3, 4, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    full = sn.flatten({"model": model.state_dict(),
                       "optim": {"state": {"emb.weight": opt.state[model.emb.weight]},
                                 "param_groups": [{"lr": 0.1}]}})
    live = sn.LiveLeaves(full)
    read = live.read(model, opt, {})
    assert set(read) == set(full) and "model/head.weight" in read
    assert live.check(read, full, ())
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    opt.param_groups[0]["lr"] = 0.05
    again = live.read(model, opt, {})
    assert torch.equal(again["model/head.weight"], model.emb.weight)
    assert again["optim/param_groups/0/lr"] == 0.05
