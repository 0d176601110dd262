"""Expected goodput of in-place recovery (ours) vs restarting every worker (Ray Train), by job size.

    python scripts/simulate_goodput.py [--json] [--from-run RUN_DIR] [--gpus 64,256,1024] ...

For each job size N (one worker per GPU) the job fails every M = per-GPU MTBF / N on average. Both
strategies checkpoint every Young/Daly interval sqrt(2 * stall * M) and pay their recovery cost per
failure; ours recovers the peer fraction of failures from a surviving replica (losing the step in
flight), restart-all rolls every failure back to the last committed checkpoint. For each N the
script gives the closed-form goodput of coordinator/goodput/availability.py and a seeded Monte
Carlo of the same model (coordinator/goodput/simulate.py) with its 95% interval, and draws both
against N.

With --from-run, ours' recovery cost is the mean `recovery_s` of the run's `recovered` events
(detection to the first step after) and the stall the median `stall_s` of its
`checkpoint_committed` events; an option given explicitly wins over the run, and the output names
where each input came from. docs/availability.md explains the model and its limits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coordinator.goodput import availability as av  # noqa: E402
from coordinator.events import Event, get_field, read_events  # noqa: E402
from coordinator.goodput.simulate import simulate_goodput, summarize  # noqa: E402

# Per-GPU MTBF: Llama 3 saw 419 unexpected interruptions in 54 days on 16,384 GPUs, one per
# 3.1 h, i.e. about 50,700 GPU-hours per interruption. Recovery costs: scripts/bench_recovery.py
# (ours with a replacement, kill to next step; Ray Train V2's TorchTrainer, its slowest run).
# Stall: the async checkpoint stall of the README's run.
DEFAULTS = {"worker_mtbf_h": 50000.0, "gpus": [64, 256, 1024, 4096, 16384], "stall_s": 0.02,
            "step_s": 1.0, "ours_recovery_s": 3.7, "restart_recovery_s": 15.4,
            "peer_fraction": 1.0, "trials": 200, "horizon_h": 720.0, "seed": 0}
STRATEGIES = ("ours", "restart")
MAX_FAILURES_PER_TRIAL = 1e6


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _gpu_list(text: str) -> List[int]:
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}")
    return gpus


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="simulate_goodput.py", description=__doc__.splitlines()[0])
    # Defaults of the inputs are None so that an explicit value can be told from a default, which
    # --from-run would otherwise replace; the help shows the real default.
    p.add_argument("--worker-mtbf-h", type=float, default=None,
                   help=f"mean time between failures of one GPU and its worker, in hours "
                        f"(default {DEFAULTS['worker_mtbf_h']:g}: Llama 3 had 419 interruptions "
                        f"in 54 days on 16,384 GPUs)")
    p.add_argument("--gpus", type=_gpu_list, default=None,
                   help=f"comma-separated job sizes, in GPUs (one worker each) (default "
                        f"{','.join(map(str, DEFAULTS['gpus']))})")
    p.add_argument("--stall-s", type=float, default=None,
                   help=f"training stall per checkpoint, in seconds (default "
                        f"{DEFAULTS['stall_s']})")
    p.add_argument("--step-s", type=float, default=None,
                   help=f"one training step, in seconds; a peer recovery loses half a step on "
                        f"average (default {DEFAULTS['step_s']})")
    p.add_argument("--ours-recovery-s", type=float, default=None,
                   help=f"ours: downtime per failure, in seconds (default "
                        f"{DEFAULTS['ours_recovery_s']}, scripts/bench_recovery.py)")
    p.add_argument("--restart-recovery-s", type=float, default=None,
                   help=f"restart-all: downtime per failure, checkpoint load included, in seconds "
                        f"(default {DEFAULTS['restart_recovery_s']}, Ray Train V2 in "
                        f"scripts/bench_recovery.py)")
    p.add_argument("--peer-fraction", type=float, default=None,
                   help=f"ours: share of failures that find a full replica alive, 0..1; the rest "
                        f"roll back to the last checkpoint (default {DEFAULTS['peer_fraction']}; "
                        f"DDP 1, FSDP2 0)")
    p.add_argument("--from-run", metavar="RUN_DIR", default=None,
                   help="take ours' recovery cost (mean recovery_s of `recovered` events) and the "
                        "stall (median stall_s of `checkpoint_committed` events) from "
                        "RUN_DIR/events.jsonl; explicit options win")
    p.add_argument("--trials", type=int, default=DEFAULTS["trials"],
                   help=f"Monte Carlo trials per job size and strategy, at least 2 (default "
                        f"{DEFAULTS['trials']})")
    p.add_argument("--horizon-h", type=float, default=DEFAULTS["horizon_h"],
                   help=f"simulated wall time of one trial, in hours (default "
                        f"{DEFAULTS['horizon_h']:g}, 30 days)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help=f"Monte Carlo seed (default {DEFAULTS['seed']})")
    p.add_argument("--plot", default="goodput_sim.png",
                   help="where to write the PNG plot (default goodput_sim.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    return p.parse_args(argv)


def run_costs(run_dir: str) -> Tuple[Dict[str, float], Dict[str, str]]:
    """What a run's event log measured: ours' recovery cost and the checkpoint stall."""
    path = os.path.join(run_dir, "events.jsonl")
    if not os.path.isdir(run_dir):
        raise ValueError(f"--from-run: {run_dir!r} is not a directory")
    if not os.path.isfile(path):
        raise ValueError(f"--from-run: no events.jsonl in {run_dir!r}")
    events = read_events(path)  # a torn line (a driver killed mid-line) is skipped
    recoveries = [get_field(e, Event.RECOVERED, "recovery_s") for e in events
                  if e["event"] == Event.RECOVERED]
    stalls = [get_field(e, Event.CHECKPOINT_COMMITTED, "stall_s") for e in events
              if e["event"] == Event.CHECKPOINT_COMMITTED]
    recoveries = [x for x in recoveries if _number(x)]
    stalls = [x for x in stalls if _number(x)]
    values, sources = {}, {}
    if recoveries:
        values["ours_recovery_s"] = statistics.fmean(recoveries)
        sources["ours_recovery_s"] = f"{path}: mean of {len(recoveries)} recovered events"
    if stalls:
        values["stall_s"] = statistics.median(stalls)
        sources["stall_s"] = f"{path}: median of {len(stalls)} checkpoint_committed events"
    return values, sources


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def resolve_inputs(a: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Each input from, in order: its option, the run (--from-run), the default."""
    from_run, run_sources = run_costs(a.from_run) if a.from_run else ({}, {})
    inputs, sources = {}, {}
    for key in ("worker_mtbf_h", "gpus", "stall_s", "step_s", "ours_recovery_s",
                "restart_recovery_s", "peer_fraction"):
        given = getattr(a, key)
        if given is not None:
            inputs[key], sources[key] = given, "--" + key.replace("_", "-")
        elif key in from_run:
            inputs[key], sources[key] = from_run[key], run_sources[key]
        else:
            inputs[key], sources[key] = DEFAULTS[key], "default"
    inputs.update(trials=a.trials, horizon_h=a.horizon_h, seed=a.seed)
    validate(inputs)
    return inputs, sources


def validate(i: Dict[str, Any]) -> None:
    def check(ok: bool, option: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{option} must be {allowed}, got {value!r}")

    check(i["worker_mtbf_h"] > 0 and math.isfinite(i["worker_mtbf_h"]), "--worker-mtbf-h",
          i["worker_mtbf_h"], "a finite number of hours > 0")
    check(bool(i["gpus"]) and all(n >= 1 for n in i["gpus"]), "--gpus", i["gpus"],
          "a non-empty list of integers >= 1")
    for key in ("stall_s", "step_s", "ours_recovery_s", "restart_recovery_s"):
        check(i[key] >= 0 and math.isfinite(i[key]), "--" + key.replace("_", "-"), i[key],
              "a finite number >= 0")
    if not (i["stall_s"] > 0 or i["step_s"] > 0):
        raise ValueError("--stall-s and --step-s are both 0: one must be > 0 to give a "
                         "checkpoint interval")
    check(0 <= i["peer_fraction"] <= 1, "--peer-fraction", i["peer_fraction"], "within [0, 1]")
    check(i["seed"] >= 0, "--seed", i["seed"], ">= 0")
    check(i["trials"] >= 2, "--trials", i["trials"], ">= 2 (the 95% interval needs two)")
    check(i["horizon_h"] > 0 and math.isfinite(i["horizon_h"]), "--horizon-h", i["horizon_h"],
          "a finite number of hours > 0")
    # The simulation takes one pass per failure; past this it would run for minutes per point.
    failures = i["horizon_h"] * max(i["gpus"]) / i["worker_mtbf_h"]
    check(failures <= MAX_FAILURES_PER_TRIAL, "--horizon-h", i["horizon_h"],
          f"short enough for at most {MAX_FAILURES_PER_TRIAL:.0e} failures per trial (this "
          f"would simulate {failures:.2g} at {max(i['gpus'])} GPUs; or raise --worker-mtbf-h)")


def strategies(i: Dict[str, Any]) -> Dict[str, av.Strategy]:
    return {"ours": av.in_place(i["ours_recovery_s"], i["peer_fraction"]),
            "restart": av.restart_all(i["restart_recovery_s"])}


def simulate(i: Dict[str, Any], progress=None) -> List[Dict[str, Any]]:
    """Closed form and Monte Carlo for every job size; `progress(line)` hears about each size."""
    worker_mtbf_s = i["worker_mtbf_h"] * 3600.0
    results = []
    for k, n in enumerate(i["gpus"], 1):
        t0 = time.perf_counter()
        row: Dict[str, Any] = {"gpus": n}
        for j, (name, strategy) in enumerate(strategies(i).items()):
            model = av.goodput(strategy, n, worker_mtbf_s, i["stall_s"], i["step_s"])
            samples = simulate_goodput(
                model["interval_s"], i["stall_s"], model["job_mtbf_s"], strategy.recovery_s,
                strategy.peer_restore_fraction, i["step_s"] / 2.0, i["horizon_h"] * 3600.0,
                # Seeded by (seed, size, strategy): a point's numbers do not change when other
                # sizes are added to --gpus.
                i["trials"], np.random.default_rng([i["seed"], n, j]))
            mc = summarize(samples)
            row["job_mtbf_h"] = round(model["job_mtbf_s"] / 3600.0, 4)
            row.setdefault("interval_s", {})[name] = round(model["interval_s"], 3)
            row.setdefault("p_failure_in_interval", {})[name] = model["p_failure_in_interval"]
            row.setdefault("lost_work_per_failure_s", {})[name] = round(
                model["lost_work_per_failure_s"], 3)
            row.setdefault("goodput", {})[name] = {
                "closed_form": round(model["goodput"], 8),
                "simulated": {"mean": round(mc.mean, 8),
                              "ci95": [round(mc.ci95[0], 8), round(mc.ci95[1], 8)]}}
        g = row["goodput"]
        row["ratio_ours_over_restart"] = {
            "closed_form": round(g["ours"]["closed_form"] / g["restart"]["closed_form"], 6),
            "simulated": round(g["ours"]["simulated"]["mean"] / g["restart"]["simulated"]["mean"],
                               6)}
        results.append(row)
        if progress:
            progress(f"[{k}/{len(i['gpus'])}] {n} GPUs: {2 * i['trials']} trials of "
                     f"{i['horizon_h']:g} h in {time.perf_counter() - t0:.1f} s")
    return results


LABELS = {"ours": "ours: survivors re-form in place, state from a surviving replica",
          "restart": "restart-all: every worker restarts from the last checkpoint (Ray Train)"}
COLORS = {"ours": "tab:blue", "restart": "tab:orange"}


def plot(results: List[Dict[str, Any]], i: Dict[str, Any], path: str) -> None:
    """Goodput against job size (top) and the same loss as minutes per day, log scale (bottom),
    where goodputs near 1 are hard to tell apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    gpus = [r["gpus"] for r in results]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    lowest = 1.0
    for name in STRATEGIES:
        closed = np.array([r["goodput"][name]["closed_form"] for r in results])
        mean = np.array([r["goodput"][name]["simulated"]["mean"] for r in results])
        lo = np.array([r["goodput"][name]["simulated"]["ci95"][0] for r in results])
        hi = np.array([r["goodput"][name]["simulated"]["ci95"][1] for r in results])
        lowest = min(lowest, closed.min(), lo.min())
        for ax, f in ((top, lambda g: g), (bottom, lambda g: (1.0 - g) * 1440.0)):
            ax.plot(gpus, f(closed), "-", color=COLORS[name], label=LABELS[name])
            # abs: 1 - g swaps which end of the interval is the lower one.
            err = np.abs(np.vstack([f(mean) - f(lo), f(hi) - f(mean)]))
            ax.errorbar(gpus, f(mean), yerr=err, fmt="o", color=COLORS[name], capsize=4,
                        mfc="none")
    handles, _ = top.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", marker="o", mfc="none", ls="none",
                          label=f"Monte Carlo: mean and 95% interval of {i['trials']} runs of "
                                f"{i['horizon_h']:g} h (lines: closed form)"))
    top.legend(handles=handles, fontsize=8, loc="lower left")
    top.set_ylim(max(0.0, 1.0 - 1.15 * (1.0 - lowest)), 1.0 + 0.05 * (1.0 - lowest))
    top.set_ylabel("goodput (share of wall time spent training)")
    top.ticklabel_format(axis="y", useOffset=False)
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    bottom.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    bottom.yaxis.set_minor_formatter(NullFormatter())
    bottom.set_ylabel("wall time lost\n(minutes per day, log scale)")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(gpus, [str(n) for n in gpus])
    bottom.set_xlabel("job size (GPUs, one worker each; log2 scale)")
    bottom.grid(alpha=0.3, which="both")
    top.set_title(
        f"Expected goodput, per-GPU MTBF {i['worker_mtbf_h']:,.0f} h, step {i['step_s']:g} s, "
        f"a checkpoint every Young/Daly interval\nstall {i['stall_s']:g} s per checkpoint; "
        f"downtime per failure: ours {i['ours_recovery_s']:.3g} s (peer fraction "
        f"{i['peer_fraction']:g}), restart-all {i['restart_recovery_s']:.3g} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: List[Dict[str, Any]]) -> str:
    """A Markdown table: model and Monte Carlo goodput, and the model's loss in minutes per day."""
    lines = ["| GPUs | job MTBF (h) | checkpoint interval (s) | goodput ours (model / MC) "
             "| goodput restart-all (model / MC) | lost min/day ours / restart-all "
             "| ours / restart-all |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        g = r["goodput"]
        lost = [(1 - g[name]["closed_form"]) * 1440 for name in STRATEGIES]
        lines.append(
            f"| {r['gpus']} | {r['job_mtbf_h']:.2f} | {r['interval_s']['ours']:.1f} "
            f"| {g['ours']['closed_form']:.5f} / {g['ours']['simulated']['mean']:.5f} "
            f"| {g['restart']['closed_form']:.5f} / {g['restart']['simulated']['mean']:.5f} "
            f"| {lost[0]:.2f} / {lost[1]:.2f} "
            f"| {r['ratio_ours_over_restart']['closed_form']:.5f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    try:
        inputs, sources = resolve_inputs(a)
        plot_dir = os.path.dirname(os.path.abspath(a.plot))
        if not os.path.isdir(plot_dir):
            raise ValueError(f"--plot: directory {plot_dir!r} does not exist")
    except ValueError as e:
        print(f"simulate_goodput.py: error: {e}", file=sys.stderr)
        return 2
    results = simulate(inputs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    plot(results, inputs, a.plot)
    out = {"benchmark": "goodput_sim", "inputs": inputs, "sources": sources, "plot": a.plot,
           "results": results}
    if a.json:
        print(json.dumps(out))
    else:
        print("inputs: " + ", ".join(f"{k}={v}" + (f" ({sources[k]})" if k in sources else "")
                                     for k, v in inputs.items()))
        print(table(results))
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
