"""The availability model (coordinator/goodput/availability.py), its Monte Carlo
(coordinator/goodput/simulate.py) and the CLI that compares the strategies (scripts/simulate_goodput.py).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from coordinator.goodput import availability as av
from coordinator.goodput.simulate import simulate_goodput, summarize

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "simulate_goodput.py")
HOUR = 3600.0


# -- formulas with known answers ---------------------------------------------------------------

def test_job_mtbf_divides_by_workers():
    assert av.job_mtbf_s(50000 * HOUR, 16384) == pytest.approx(50000 * HOUR / 16384)
    # Llama 3: one interruption per ~3.1 h on 16,384 GPUs is a per-GPU MTBF of ~50,000 h.
    assert av.job_mtbf_s(50000 * HOUR, 16384) / HOUR == pytest.approx(3.05, abs=0.01)


def test_p_failure_one_worker_and_many():
    t, m = 600.0, 7200.0
    assert av.p_failure_in_interval(t, m, 1) == pytest.approx(1 - math.exp(-t / m), rel=1e-12)
    assert av.p_failure_in_interval(t, m, 8) == pytest.approx(1 - math.exp(-8 * t / m), rel=1e-12)
    p = 1 - math.exp(-t / m)
    assert av.p_failure_in_interval(t, m, 8) == pytest.approx(1 - (1 - p) ** 8, rel=1e-12)
    # Tiny per-worker probabilities do not round away: 1e-7 per worker, 16,384 workers.
    assert av.p_failure_in_interval(0.018, 50000 * HOUR, 16384) == pytest.approx(
        16384 * 0.018 / (50000 * HOUR), rel=1e-6)
    assert av.p_failure_in_interval(0.0, m, 8) == 0.0


def test_young_daly():
    assert av.young_daly_interval_s(2.0, 10000.0) == pytest.approx(200.0)
    assert av.young_daly_interval_s(0.0, 10000.0) == 0.0
    with pytest.raises(ValueError, match="checkpoint_cost_s"):
        av.young_daly_interval_s(-1.0, 10000.0)
    with pytest.raises(ValueError, match="mtbf_s"):
        av.young_daly_interval_s(2.0, 0.0)


def test_lost_work_halves():
    assert av.expected_lost_work_s(100.0) == 50.0  # rollback: half an interval
    assert av.expected_lost_work_s(100.0, 1.0, 2.0) == 1.0  # from a peer: half a step
    assert av.expected_lost_work_s(100.0, 0.5, 2.0) == pytest.approx(25.5)
    with pytest.raises(ValueError, match="peer_restore_fraction"):
        av.expected_lost_work_s(100.0, 1.5)


def test_goodput_closed_forms_at_the_ends():
    tau, c, m, r, lost = 141.0, 10.0, 1000.0, 50.0, 0.5
    lam = 1 / m
    daly = tau / (math.exp(lam * r) * (math.exp(lam * (tau + c)) - 1) / lam)
    assert av.expected_goodput(tau, c, m, r, 0.0, lost) == pytest.approx(daly, rel=1e-12)
    in_place = tau / (tau + c) * math.exp(-lam * (r + lost))
    assert av.expected_goodput(tau, c, m, r, 1.0, lost) == pytest.approx(in_place, rel=1e-12)
    # The mixture is continuous at f = 1, where kappa = 0 takes another code path.
    assert av.expected_goodput(tau, c, m, r, 1 - 1e-9, lost) == pytest.approx(in_place, rel=1e-6)
    # No failures: only the checkpoint stall costs.
    assert av.expected_goodput(tau, c, 1e15, r, 0.3, lost) == pytest.approx(tau / (tau + c))
    # Failures far faster than a recovery: nothing trains (and nothing overflows).
    assert av.expected_goodput(tau, c, 0.01, r, 1.0, lost) == 0.0
    assert av.expected_goodput(tau, c, 0.01, r, 0.5, lost) == 0.0


def test_strategies_and_goodput_dict():
    ours, theirs = av.in_place(3.7), av.restart_all(15.4)
    assert (ours.peer_restore_fraction, theirs.peer_restore_fraction) == (1.0, 0.0)
    with pytest.raises(ValueError, match="recovery_s"):
        av.in_place(-1.0)
    with pytest.raises(ValueError, match="peer_restore_fraction"):
        av.in_place(1.0, 1.5)
    g = av.goodput(theirs, 1024, 50000 * HOUR, 0.02, 1.0)
    assert g["job_mtbf_s"] == pytest.approx(50000 * HOUR / 1024)
    assert g["interval_s"] == pytest.approx(math.sqrt(2 * 0.02 * g["job_mtbf_s"]))
    assert g["lost_work_per_failure_s"] == pytest.approx(g["interval_s"] / 2)
    assert 0 < g["p_failure_in_interval"] < 0.01
    assert av.goodput(ours, 1024, 50000 * HOUR, 0.02, 1.0)["goodput"] > g["goodput"]
    assert av.goodput(theirs, 1024, 50000 * HOUR, 0.02, 1.0, interval_s=60.0)["interval_s"] == 60.0


def test_young_daly_is_near_optimal_for_restart():
    c, m, r = 2.0, 100000.0, 30.0  # C << M
    tau = av.young_daly_interval_s(c, m)
    best = av.expected_goodput(tau, c, m, r)
    assert best >= av.expected_goodput(0.5 * tau, c, m, r)
    assert best >= av.expected_goodput(2.0 * tau, c, m, r)
    # Without rollbacks a checkpoint only costs: in place, a longer interval is always better,
    # so Young/Daly is a conservative choice for ours (the checkpoint is kept for durability).
    assert av.expected_goodput(2 * tau, c, m, r, 1.0, 0.5) > av.expected_goodput(
        tau, c, m, r, 1.0, 0.5)


# -- the Monte Carlo against the closed form ----------------------------------------------------

# A failure-heavy job (job MTBF 1000 s) so that both strategies lose a lot and 20 runs of
# 1e6 s (~1000 failures each) pin the mean to ~1e-3.
M, C, STEP, HORIZON, TRIALS = 1000.0, 10.0, 1.0, 1e6, 20
TAU = av.young_daly_interval_s(C, M)
CASES = {  # name: (recovery_s, peer_restore_fraction)
    "restart_all": (50.0, 0.0),
    "in_place": (10.0, 1.0),
    "mixed": (10.0, 0.5),
}


def _mc(recovery_s, fraction, seed):
    samples = simulate_goodput(TAU, C, M, recovery_s, fraction, STEP / 2, HORIZON, TRIALS,
                               np.random.default_rng(seed))
    return summarize(samples)


@pytest.mark.parametrize("name", sorted(CASES))
def test_monte_carlo_agrees_with_closed_form(name):
    recovery_s, fraction = CASES[name]
    closed = av.expected_goodput(TAU, C, M, recovery_s, fraction, STEP / 2)
    mc = _mc(recovery_s, fraction, seed=sorted(CASES).index(name))
    # 4 standard errors (a false alarm about once in 16,000 runs) plus the edge effect of a finite
    # run, about one segment's work over the horizon (see coordinator/goodput/simulate.py's module doc).
    assert abs(mc.mean - closed) <= 4 * mc.stderr + TAU / HORIZON, (mc, closed)
    assert mc.ci95[0] < mc.mean < mc.ci95[1]


def test_monte_carlo_tells_strategies_and_wrong_formulas_apart():
    """The agreement above means something: the same simulation rejects the other strategy's
    formula and the first-order approximation at this failure rate."""
    ours = _mc(*CASES["in_place"], seed=10)
    theirs = _mc(*CASES["restart_all"], seed=11)
    closed_theirs = av.expected_goodput(TAU, C, M, *CASES["restart_all"])
    assert ours.mean - theirs.mean > 0.05
    assert abs(ours.mean - closed_theirs) > 20 * ours.stderr
    lam, r = 1 / M, CASES["restart_all"][0]
    first_order = 1 - C / (TAU + C) - lam * (r + (TAU + C) / 2)
    assert abs(theirs.mean - first_order) > 4 * theirs.stderr + TAU / HORIZON


def test_monte_carlo_checks_the_mixture_where_it_matters():
    """Half the failures from peers, in a job that fails every 100 s: the exact mixture agrees,
    and a blend of the two pure strategies' goodputs, weighted by f, does not (goodput is not
    linear in f), so the simulation can tell a wrong mixture from the right one."""
    tau, c, m, r, lost, f, horizon = 80.0, 10.0, 100.0, 30.0, 5.0, 0.5, 2e5
    mc = summarize(simulate_goodput(tau, c, m, r, f, lost, horizon, TRIALS,
                                    np.random.default_rng(3)))
    exact = av.expected_goodput(tau, c, m, r, f, lost)
    blend = (1 - f) * av.expected_goodput(tau, c, m, r, 0.0, lost) + f * av.expected_goodput(
        tau, c, m, r, 1.0, lost)
    tolerance = 4 * mc.stderr + tau / horizon
    assert abs(mc.mean - exact) <= tolerance, (mc, exact)
    assert abs(mc.mean - blend) > tolerance, (mc, blend)


def test_monte_carlo_without_failures_is_the_checkpoint_share():
    samples = simulate_goodput(90.0, 10.0, 1e15, 5.0, 0.0, 0.0, 1000.0, 3,
                               np.random.default_rng(0))
    assert samples == pytest.approx([0.9] * 3)  # 10 segments of 90 s work + 10 s stall


# -- the CLI --------------------------------------------------------------------------------------

def _cli(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


TINY = ["--gpus", "64,4096", "--trials", "3", "--horizon-h", "48"]


def test_cli_json_and_plot(tmp_path):
    png = tmp_path / "a plot 'quoted'.png"
    proc = _cli(*TINY, "--plot", str(png), "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    out = json.loads(proc.stdout)
    assert [r["gpus"] for r in out["results"]] == [64, 4096]
    assert out["sources"]["gpus"] == "--gpus"
    assert {v for k, v in out["sources"].items() if k != "gpus"} == {"default"}
    big = out["results"][1]
    assert big["job_mtbf_h"] == pytest.approx(50000 / 4096, abs=1e-3)
    for name in ("ours", "restart"):
        lo, hi = big["goodput"][name]["simulated"]["ci95"]
        assert 0 < lo <= hi <= 1
        assert 0 < big["goodput"][name]["closed_form"] < 1
    assert big["ratio_ours_over_restart"]["closed_form"] > 1
    assert "4096 GPUs" in proc.stderr  # progress goes to stderr, never into the JSON
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_from_run(tmp_path):
    run = tmp_path / "run dir"
    run.mkdir()
    events = [{"t": 1.0, "event": "run_started"},
              {"t": 2.0, "event": "checkpoint_committed", "step": 10, "stall_s": 0.01},
              {"t": 3.0, "event": "checkpoint_committed", "step": 20, "stall_s": 0.05},
              {"t": 4.0, "event": "checkpoint_committed", "step": 30, "stall_s": 0.03},
              {"t": 5.0, "event": "recovered", "recovery_s": 2.0},
              {"t": 6.0, "event": "recovered", "recovery_s": 4.0}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = _cli(*TINY, "--from-run", str(run), "--plot", str(tmp_path / "p.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["inputs"]["ours_recovery_s"] == pytest.approx(3.0)
    assert out["inputs"]["stall_s"] == pytest.approx(0.03)
    assert "2 recovered events" in out["sources"]["ours_recovery_s"]
    assert "3 checkpoint_committed events" in out["sources"]["stall_s"]
    assert out["sources"]["restart_recovery_s"] == "default"  # the run has no restart to measure
    m = out["results"][0]["job_mtbf_h"] * HOUR
    assert out["results"][0]["interval_s"]["ours"] == pytest.approx(
        math.sqrt(2 * 0.03 * m), abs=1e-3)
    # An explicit option wins over the run.
    proc = _cli(*TINY, "--from-run", str(run), "--stall-s", "0.5",
                "--plot", str(tmp_path / "p.png"), "--json")
    out = json.loads(proc.stdout)
    assert (out["inputs"]["stall_s"], out["sources"]["stall_s"]) == (0.5, "--stall-s")
    assert out["inputs"]["ours_recovery_s"] == pytest.approx(3.0)


def test_cli_from_run_without_measurements_falls_back(tmp_path):
    (tmp_path / "events.jsonl").write_text("")
    proc = _cli(*TINY, "--from-run", str(tmp_path), "--plot", str(tmp_path / "p.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sources"]["ours_recovery_s"] == "default"


@pytest.mark.parametrize("args, message", [
    (["--worker-mtbf-h", "-1"], "--worker-mtbf-h"),
    (["--gpus", ""], "--gpus"),
    (["--gpus", "64,x"], "--gpus"),
    (["--peer-fraction", "1.5"], "--peer-fraction"),
    (["--from-run", "/no/such/run dir"], "--from-run"),
    (["--no-such-option"], "unrecognized"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message):
    proc = _cli(*args, "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simulate_goodput.py: error:"), proc.stderr
    assert message in lines[0]


def test_cli_from_run_skips_a_torn_line(tmp_path):
    """A driver killed mid-line leaves a torn last line: the whole lines still count, as they do
    for the report (one reader for both)."""
    (tmp_path / "events.jsonl").write_text('{"t": 1.0, "event": "recovered", "recovery_s": 2.0}\n'
                                           '{"t": 2.0, "event": "recov')
    proc = _cli(*TINY, "--from-run", str(tmp_path), "--plot", str(tmp_path / "p.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["inputs"]["ours_recovery_s"] == pytest.approx(2.0)
    assert "1 recovered events" in out["sources"]["ours_recovery_s"]
    assert "skipped 1 line" in proc.stderr
