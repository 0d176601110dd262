import pytest

"""The failure policy, node isolation and the chaos schedule on their own (pure functions)."""

from coordinator.chaos import ChaosPlan, random_schedule
from coordinator.config import load_config

pytestmark = pytest.mark.unit
from coordinator.control.failure_policy import Facts, NodeIsolation, backoff, decide, grow_plan
from coordinator.protocol import PlanAction, SourceKind


def facts(**kw):
    base = dict(world_size=4, survivors={0: 10, 2: 10, 3: 9}, ready=1, min_workers=2,
                max_workers=4, parallelism="ddp", checkpoint_step=5, failures=1,
                max_failures=10, streak=1, backoff_s=1.0, backoff_max_s=8.0)
    base.update(kw)
    return Facts(**base)


def test_replacement_takes_the_vacant_rank_and_the_best_survivor_sends():
    p = decide(facts())
    assert p.action == "reform" and p.world_size == 4
    assert p.ranks == {0: 0, 2: 2, 3: 3} and p.newcomers == [1]
    assert p.source == "peer" and p.src == 0 and p.resumed_step == 10 and p.backoff_s == 0


def test_shrink_reassigns_ranks_densely():
    p = decide(facts(ready=0, survivors={0: 9, 2: 10, 3: 10}))
    assert p.world_size == 3 and p.ranks == {0: 0, 2: 1, 3: 2} and p.newcomers == []
    assert p.src == 1 and p.resumed_step == 10  # old rank 2, the lowest of the highest step
    assert "shrinking 4 -> 3" in p.reason


def test_growing_past_the_old_size_appends_ranks():
    p = decide(facts(world_size=3, survivors={0: 7, 1: 7}, ready=2))
    assert p.world_size == 4 and p.ranks == {0: 0, 1: 1} and p.newcomers == [2, 3]


def test_fsdp_and_stale_survivors_use_the_checkpoint():
    p = decide(facts(parallelism="fsdp"))
    assert p.source == "checkpoint" and p.resumed_step == 5 and "shards were lost" in p.reason
    p = decide(facts(parallelism="fsdp", checkpoint_step=None))
    assert p.source == "init" and p.resumed_step == 0
    # DDP survivors that are all newcomers (step 0) do not beat a checkpoint at step 5
    p = decide(facts(survivors={0: 0, 1: 0}, ready=2))
    assert p.source == "checkpoint" and p.resumed_step == 5


def test_budget_wait_and_abort():
    assert decide(facts(failures=11)).action == "abort"
    p = decide(facts(survivors={0: 3}, ready=0))
    assert p.action == "wait" and "1 short of scaling.min_workers=2" in p.reason
    p = decide(facts(survivors={0: 3}, ready=0, waited_s=61, wait_limit_s=60))
    assert p.action == "abort" and "failure.wait_for_workers_s=60" in p.reason


def test_backoff_doubles_for_failures_in_a_row_and_is_capped():
    assert [backoff(n, 1.0, 8.0) for n in range(1, 7)] == [0, 1, 2, 4, 8, 8]
    assert decide(facts(streak=3)).backoff_s == 2


def test_grow_plan_keeps_ranks_and_appends():
    p = grow_plan(2, 3, 4, 40)
    assert p.world_size == 4 and p.ranks == {0: 0, 1: 1} and p.newcomers == [2, 3]
    assert p.source == "peer" and p.src == 0 and p.resumed_step == 40


def test_node_isolation_counts_and_fires_once():
    iso = NodeIsolation(2)
    assert [iso.record("a"), iso.record("b"), iso.record("a"), iso.record("a")] == \
        [False, False, True, False]
    assert iso.isolated == ["a"] and iso.counts == {"a": 3, "b": 1}
    assert not NodeIsolation(0).record("a")


def test_random_chaos_schedule_is_seeded_and_brings_nodes_back():
    cfg = load_config(None, ["chaos.random_faults=6", "chaos.random_seed=7",
                             "chaos.random_min_gap=20"]).chaos
    a, b = random_schedule(cfg, 1000, 4), random_schedule(cfg, 1000, 4)
    assert [(e.at_step, e.action, e.target) for e in a] == \
        [(e.at_step, e.action, e.target) for e in b]
    steps = [e.at_step for e in a if e.action != "add_node"]
    assert len(steps) == 6 and all(y - x >= 20 for x, y in zip(steps, steps[1:]))
    for e in a:
        if e.action == "kill_node":
            assert any(x.action == "add_node" and x.at_step > e.at_step for x in a)
    plan = ChaosPlan(cfg, 1000, 4)
    first = plan.due(steps[0])
    assert first and plan.due(steps[0]) == []


def test_a_replacement_waits_briefly_for_the_slot_of_a_worker_lost_on_a_live_node():
    from coordinator.control.scaling_policy import SLOT_RELEASE_S, await_freed_slot

    assert await_freed_slot(True, 1, on_live_node=True, spawned=False, since_loss_s=0.1)
    assert not await_freed_slot(True, 1, on_live_node=True, spawned=False,
                                since_loss_s=SLOT_RELEASE_S)
    assert not await_freed_slot(True, 1, on_live_node=False, spawned=False, since_loss_s=0.1)
    assert not await_freed_slot(True, 1, on_live_node=True, spawned=True, since_loss_s=0.1)
    assert not await_freed_slot(False, 1, on_live_node=True, spawned=False, since_loss_s=0.1)
    assert not await_freed_slot(True, 0, on_live_node=True, spawned=False, since_loss_s=0.1)


def test_hang_rule_needs_a_peer_that_answers():
    from coordinator.control.failure_policy import hung

    assert hung({0: 1.0, 1: 12.0, 2: 0.5}, limit_s=10) == [1]
    assert hung({0: 11.0, 1: 12.0}, limit_s=10) == []  # nobody answers: the view is in doubt
    assert hung({0: 10.0, 1: 0.0}, limit_s=10) == []  # at the limit is not past it
    assert hung({}, limit_s=10) == []


def test_a_worker_in_a_long_phase_gets_the_busy_limit_and_a_frozen_one_still_does_not():
    """A worker whose last answer said it was saving (or building, joining, digesting) is
    allowed failure.busy_hang_timeout_s of silence; a worker in no such phase, its plain
    failure.hang_timeout_s, whatever its peers are doing."""
    from coordinator.control.failure_policy import all_frozen, hung

    saving = {1: "saving a checkpoint"}
    assert hung({0: 0.5, 1: 12.0}, 3, saving, 60) == []  # a long save: not a hang
    assert hung({0: 0.5, 1: 61.0}, 3, saving, 60) == [1]  # past the busy limit: hung
    assert hung({0: 0.5, 1: 12.0, 2: 4.0}, 3, saving, 60) == [2]  # the idle one is
    assert hung({0: 12.0, 1: 4.0}, 3, {0: "joining generation 2"}, 60) == []  # none answers
    assert hung({0: 0.5, 1: 12.0}, 3, saving, None) == [1]  # no busy limit: the plain rule
    assert all_frozen({0: 12.0}, stalled_s=12.0, limit_s=3, busy={0: "taking the final digest"},
                      busy_limit_s=60) == []
    assert all_frozen({0: 70.0}, stalled_s=70.0, limit_s=3, busy={0: "taking the final digest"},
                      busy_limit_s=60) == [0]


def test_settle_grace_is_long_whatever_the_parallelism():
    from coordinator.control.failure_policy import SETTLE_MIN_S, settle_grace_s

    assert settle_grace_s(10.0) == SETTLE_MIN_S and settle_grace_s(3.0) == SETTLE_MIN_S
    assert settle_grace_s(30.0) == 30.0


def test_replacements_restore_the_size_before_the_failure():
    from coordinator.control.scaling_policy import replacements

    r = replacements(world_size=4, survivors=3, pending=0, min_workers=2, max_workers=4,
                     replace=True)
    assert (r.want, r.needed) == (1, True)
    r = replacements(4, 3, pending=1, min_workers=2, max_workers=4, replace=True)
    assert r.want == 0  # one already starting
    r = replacements(4, 3, 0, min_workers=2, max_workers=4, replace=False)
    assert (r.want, r.needed) == (1, False)  # start it, but do not wait for it
    r = replacements(4, 1, 0, min_workers=2, max_workers=4, replace=False)
    assert r.needed  # below min_workers: wait whatever failure.replace says
    r = replacements(2, 1, 0, min_workers=3, max_workers=4, replace=True)
    assert r.want == 2  # back to at least min_workers


def test_growth_pauses_once_every_newcomer_is_ready_and_keeps_spares_at_max():
    from coordinator.control.scaling_policy import growth

    g = growth(2, 4, grow=True, spare_workers=0, ready=1, starting=1, pending=2, check_due=True)
    assert not g.pause and g.spawn == 0  # one still starting: wait for it, start no more
    g = growth(2, 4, grow=True, spare_workers=0, ready=2, starting=0, pending=2, check_due=False)
    assert g.pause
    g = growth(2, 4, grow=True, spare_workers=0, ready=0, starting=0, pending=0, check_due=True)
    assert g.spawn == 2 and not g.spares
    g = growth(2, 4, grow=True, spare_workers=0, ready=0, starting=0, pending=0, check_due=False)
    assert g.spawn == 0  # only every scaling.grow_check_s
    g = growth(4, 4, grow=True, spare_workers=1, ready=0, starting=0, pending=0, check_due=True)
    assert g.spawn == 1 and g.spares and not g.pause
    g = growth(3, 4, grow=False, spare_workers=1, ready=1, starting=0, pending=1, check_due=True)
    assert not g.pause and g.spawn == 0  # growth off: the ready one is the spare


def test_all_frozen_needs_silence_and_no_progress():
    from coordinator.control.failure_policy import all_frozen

    assert all_frozen({0: 12.0}, stalled_s=12.0, limit_s=10) == [0]  # a one-worker job
    assert all_frozen({0: 12.0, 1: 11.0}, stalled_s=11.0, limit_s=10) == [0, 1]
    assert all_frozen({0: 12.0, 1: 11.0}, stalled_s=3.0, limit_s=10) == []  # steps complete
    assert all_frozen({0: 12.0, 1: 1.0}, stalled_s=30.0, limit_s=10) == []  # a slow step
    assert all_frozen({}, stalled_s=30.0, limit_s=10) == []


def test_a_sender_whose_state_failed_its_checksum_sends_no_more():
    # the next best survivor sends instead
    p = decide(facts(survivors={0: 10, 1: 0, 2: 10, 3: 9}, ready=0, bad_sources={0}))
    assert p.source == "peer" and p.src == 2 and p.resumed_step == 10
    assert p.reason.startswith("the state rank 0 sent failed its checksum; ")
    # no other survivor as new as the checkpoint: the checkpoint
    p = decide(facts(world_size=2, survivors={0: 10, 1: 0}, ready=0, bad_sources={0}))
    assert p.source == "checkpoint" and p.resumed_step == 5 and p.ranks == {0: 0, 1: 1}
    assert "no other survivor holds a newer state" in p.reason
    # no checkpoint: the newcomer's fresh state (step 0) is sent, i.e. starting over
    p = decide(facts(world_size=2, survivors={0: 10, 1: 0}, ready=0, bad_sources={0},
                     checkpoint_step=None))
    assert p.source == "peer" and p.src == 1 and p.resumed_step == 0
    # every member failed as a sender and nothing is committed: no state anyone could check
    p = decide(facts(world_size=2, survivors={0: 10, 1: 0}, ready=0, bad_sources={0, 1},
                     checkpoint_step=None))
    assert p.action == "abort" and "no committed checkpoint" in p.reason
    # FSDP2 members hold no state after a failed join: the checkpoint, as for any loss
    p = decide(facts(parallelism="fsdp", bad_sources={0}))
    assert p.source == "checkpoint"


# ---- HSDP: the world is whole shard groups; a shard's replicas stand in for each other -------

def _held(world, step, lost=()):
    """Every surviving owner holds its own shard at `step` and the step before (no buddies)."""
    return {o: {step - 1: [o], step: [o]} for o in range(world) if o not in lost}


def hsdp(**kw):
    base = dict(parallelism="hsdp", shard_group_size=2, checkpoint_step=None,
                memory_world=4, memory_generation=1)
    base.update(kw)
    return facts(**base)


def test_hsdp_a_lost_rank_takes_its_shard_from_its_replica_in_the_other_group():
    p = decide(hsdp(survivors={0: 10, 2: 10, 3: 10}, ready=1, memory=_held(4, 10, lost=[1])))
    assert p.source == SourceKind.MEMORY and p.resumed_step == 10 and p.world_size == 4
    assert p.newcomers == [1]
    # one owner per shard: shard 0 from rank 0 itself, shard 1 from rank 3 (rank 1's replica)
    assert p.holders == {0: 0, 3: 3}
    assert "replicas" in p.reason


def test_hsdp_a_lost_shard_group_recovers_from_the_other_and_shrinks_to_whole_groups():
    # ranks 0 and 1 (a whole shard group, one node) lost, no newcomer: 2 -> one group of 2
    p = decide(hsdp(survivors={2: 10, 3: 10}, ready=0, memory=_held(4, 10, lost=[0, 1])))
    assert p.source == SourceKind.MEMORY and p.world_size == 2
    assert p.ranks == {2: 0, 3: 1} and p.holders == {2: 0, 3: 1}


def test_hsdp_a_shrink_keeps_a_whole_group_and_leaves_the_rest_idle():
    # rank 1 lost, no newcomer: 3 survivors cannot form 3 ranks of groups of 2; the whole
    # group (2, 3) is kept, rank 0 left over (the controller keeps it as an idle spare)
    p = decide(hsdp(survivors={0: 10, 2: 10, 3: 10}, ready=0, memory=_held(4, 10, lost=[1])))
    assert p.world_size == 2 and p.ranks == {2: 0, 3: 1} and p.source == SourceKind.MEMORY
    # below min_workers in whole groups: wait
    p = decide(hsdp(survivors={0: 10, 2: 10, 3: 10}, ready=0, min_workers=3,
                    memory=_held(4, 10, lost=[1])))
    assert p.action == PlanAction.WAIT


def test_hsdp_a_shard_and_every_replica_lost_falls_back_with_the_reason():
    p = decide(hsdp(survivors={0: 10, 2: 10}, ready=2, checkpoint_step=5,
                    memory=_held(4, 10, lost=[1, 3])))
    assert p.source == SourceKind.CHECKPOINT and p.resumed_step == 5
    assert "ranks [1, 3]" in p.reason and "every copy" in p.reason


def test_hsdp_sizes_grow_and_start_in_whole_groups():
    from coordinator.control.scaling_policy import ScalingPolicy, growth

    assert grow_plan(2, 1, 4, step=7, shard_group_size=2).world_size == 2  # not a whole group
    assert grow_plan(2, 2, 4, step=7, shard_group_size=2).world_size == 4
    g = growth(2, 4, grow=True, spare_workers=0, ready=1, starting=0, pending=1, check_due=True,
               shard_group_size=2)
    assert not g.pause and g.spawn == 1  # one more, then a whole group joins
    assert ScalingPolicy(2, 4, 2).initial(3).world_size == 2
    assert ScalingPolicy(2, 5, 2).initial(8).world_size == 4
    assert ScalingPolicy(2, 4, 4).initial(3).world_size is None
