"""The auto checkpoint interval policy (facts in, a choice out) and its schedule."""

import math

import pytest

from coordinator.checkpoint.interval import AutoInterval, AutoSchedule

pytestmark = pytest.mark.unit


def test_the_first_choice_is_a_warm_up_checkpoint_to_measure_the_stall():
    c = AutoInterval(worker_mtbf_prior_s=3600, total_steps=1000, warmup_steps=50).choose(
        world_size=4, failures=0, exposure_worker_s=0, step_s=None)
    assert c.interval_steps == 50 and c.stall_s is None and c.mtbf_source == "configured"
    assert c.job_mtbf_s == 900


def test_young_daly_from_the_median_stall_and_the_prior_then_the_observed_rate():
    p = AutoInterval(worker_mtbf_prior_s=40_000, total_steps=100_000, warmup_steps=50)
    for stall in (0.5, 0.1, 0.2):  # median 0.2
        p.observe_checkpoint(stall, persist_s=1.0)
    c = p.choose(world_size=8, failures=0, exposure_worker_s=800, step_s=0.5)
    assert c.job_mtbf_s == 5000 and c.stall_s == 0.2
    assert c.interval_s == pytest.approx(math.sqrt(2 * 0.2 * 5000))  # 44.7 s
    assert c.interval_steps == math.ceil(c.interval_s / 0.5)
    # 2 failures in 800 worker-seconds: 400 s per worker, 50 s for the job of 8
    c = p.choose(world_size=8, failures=2, exposure_worker_s=800, step_s=0.5)
    assert c.mtbf_source == "observed" and c.job_mtbf_s == 50
    assert c.interval_s == pytest.approx(math.sqrt(2 * 0.2 * 50))


def test_never_shorter_than_the_last_persist_nor_one_step_nor_longer_than_the_job():
    p = AutoInterval(worker_mtbf_prior_s=1.0, total_steps=300, warmup_steps=10)
    p.observe_checkpoint(0.01, persist_s=2.5)
    c = p.choose(world_size=1, failures=0, exposure_worker_s=0, step_s=0.1)
    assert c.interval_s == 2.5 and c.interval_steps == 25 and "persist" in c.reason
    p.observe_checkpoint(0.01, persist_s=0.0)
    assert p.choose(1, 0, 0, step_s=10.0).interval_steps == 1
    p = AutoInterval(worker_mtbf_prior_s=1e9, total_steps=300, warmup_steps=10)
    p.observe_checkpoint(1.0, persist_s=1.0)
    assert p.choose(1, 0, 0, step_s=0.01).interval_steps == 300


def test_the_schedule_keeps_one_request_in_flight_and_follows_restores():
    s = AutoSchedule(AutoInterval(worker_mtbf_prior_s=1e6, total_steps=1000, warmup_steps=20))
    fresh, ask = s.tick(10, 4, 0, 0.0, None)
    assert fresh is not None and fresh.interval_steps == 20 and not ask
    assert s.tick(20, 4, 0, 0.0, None) == (None, True) and s.number == 1 and s.asked_at == 20
    assert s.tick(40, 4, 0, 0.0, None) == (None, False)  # still in flight
    s.settled([19])  # an older save settling does not answer it
    assert s.asked_at == 20
    s.committed(21, 0.05, 0.2)
    s.settled([21])
    assert s.asked_at is None and s.last_save_step == 21
    fresh, _ = s.tick(25, 4, 0, 4000.0, 0.1)
    assert fresh is not None and "Young/Daly" in fresh.reason
    s.new_generation(restored_step=5)  # a rollback: the last checkpoint is the restored one
    assert s.last_save_step == 5 and s.asked_at is None
    assert s.tick(1000, 4, 0, 4000.0, 0.1) == (None, False)  # nothing after the last step
