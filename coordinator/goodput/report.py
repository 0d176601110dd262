"""`python -m coordinator report RUN_DIR`: the goodput breakdown as a table, and
`RUN_DIR/timeline.png`: world size and training progress over time, with failures, recoveries and
checkpoints marked and every span coloured by where its time went."""

from __future__ import annotations

import collections
import os
import statistics
import sys
from typing import Any, Dict, List, TextIO, Tuple

from coordinator.events import Event, get_field
from coordinator.goodput import accounting, availability

LABELS = {
    "productive": "productive training",
    "checkpoint_stall": "checkpoint stall",
    "recomputed": "recomputed (lost steps)",
    "detection": "failure detection",
    "reformation": "re-formation",
    "restore": "state restore",
    "waiting_for_capacity": "waiting for capacity",
    "startup": "start-up",
    "shutdown": "shutdown",
}
COLORS = {
    "running": "#4caf50", "startup": "#b0bec5", "waiting_for_capacity": "#ffd54f",
    "detection": "#e53935", "reformation": "#fb8c00", "restore": "#8e24aa", "shutdown": "#cfd8dc",
}
FAILURE_COLORS = {
    "process_exit": "#b71c1c", "node_lost": "#000000", "hang": "#6a1b9a",
    "collective_error": "#ef6c00", "task_error": "#ad1457", "preempt": "#1565c0",
}
PHASE_LABELS = {
    "running": "training (incl. checkpoint stalls)", "startup": "start-up",
    "waiting_for_capacity": "waiting for capacity", "detection": "failure detection",
    "reformation": "re-formation", "restore": "state restore", "shutdown": "shutdown",
}


def _of(events: List[Dict[str, Any]], kind: Event) -> List[Dict[str, Any]]:
    return [e for e in events if e["event"] == kind]


def model_check(b: Dict[str, Any], events: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What the availability model (coordinator/goodput/availability.py) predicts for this run,
    fed with the run's own measurements, next to what the run measured. Both leave start-up,
    shutdown and waiting for capacity out (the model has none). None when the run saw no
    failure."""
    sec = b["seconds"]
    if not b["failures"]:
        return {}
    steady = b["wall_s"] - sec["startup"] - sec["shutdown"] - sec["waiting_for_capacity"]
    rec = _of(events, Event.RECOVERED)
    commits = _of(events, Event.CHECKPOINT_COMMITTED)
    if steady <= 0 or not rec:
        return {}
    per_step = [a["seconds_per_step"] for a in b["attempts"] if a["seconds_per_step"] > 0]
    step_s = statistics.median(per_step) if per_step else 0.0
    inputs = {
        "job_mtbf_s": steady / b["failures"],  # failures per steady wall time
        "stall_s": statistics.median(get_field(e, Event.CHECKPOINT_COMMITTED, "stall_s")
                                     for e in commits) if commits else 0.0,
        # work between checkpoints: productive time over the checkpoints taken
        "interval_s": sec["productive"] / len(commits) if commits else steady,
        # downtime per failure: its detection plus detection -> training again
        "recovery_s": sec["detection"] / b["failures"]
        + statistics.mean(get_field(e, Event.RECOVERED, "recovery_s") for e in rec),
        "peer_fraction": sum(get_field(e, Event.RECOVERED, "source") in ("peer", "memory")
                             for e in rec) / len(rec),
        "step_s": step_s,
    }
    exact = availability.expected_goodput(
        inputs["interval_s"], inputs["stall_s"], inputs["job_mtbf_s"], inputs["recovery_s"],
        inputs["peer_fraction"], step_s / 2.0)
    lost = availability.expected_lost_work_s(inputs["interval_s"], inputs["peer_fraction"], step_s)
    first = availability.first_order_goodput(inputs["interval_s"], inputs["stall_s"],
                                             inputs["job_mtbf_s"], inputs["recovery_s"], lost)
    return {"inputs": {k: round(v, 4) for k, v in inputs.items()},
            "measured": round(sec["productive"] / steady, 4),
            "modelled_poisson": round(exact, 4), "modelled_first_order": round(first, 4)}


def format_table(b: Dict[str, Any], events: List[Dict[str, Any]], run_dir: str) -> str:
    lines = []
    att = b["attempts"]
    steps = max((a["steps"] for a in att), default=0)
    statuses = ", ".join(a["status"] for a in att)
    lines.append(f"run {run_dir}: {len(att)} attempt(s) ({statuses}), {b['wall_s']:.1f}s wall, "
                 f"step {steps}")
    g, gw = b["goodput"], b.get("worker_goodput")
    if g is None:
        lines.append("goodput - (no time recorded)")
    else:
        lines.append(f"goodput {100 * g:.1f}% of the wall time, {100 * (gw or 0):.1f}% of the "
                     "worker time (GPU time), trained the model")
    lines.append("")
    lines.append(f"  {'where the time went':<26}{'seconds':>10}{'share':>8}"
                 f"{'worker-s':>11}{'share':>8}")
    wall = b["wall_s"] or 1.0
    wsum = b.get("worker_s") or 1.0
    for c in accounting.CATEGORIES:
        sec, ws = b["seconds"][c], b["worker_seconds"][c]
        bar = "#" * int(round(25 * sec / wall))
        lines.append(f"  {LABELS[c]:<26}{sec:>10.2f}{100 * sec / wall:>7.1f}%"
                     f"{ws:>11.1f}{100 * ws / wsum:>7.1f}%  {bar}")
    lines.append(f"  {'total':<26}{b['wall_s']:>10.2f}{100.0:>7.1f}%{b['worker_s']:>11.1f}"
                 f"{100.0:>7.1f}%")
    if b["between_runs_s"]:
        lines.append(f"  ({b['between_runs_s']:.1f}s between attempts, no workers held: "
                     "not counted)")
    lines.append("")
    kinds = collections.Counter(get_field(e, Event.FAILURE_DETECTED, "kind")
                                for e in _of(events, Event.FAILURE_DETECTED))
    rec = _of(events, Event.RECOVERED)
    kind_s = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
    line = f"failures detected: {kind_s}; recoveries {len(rec)}"
    if rec:
        rs = [get_field(e, Event.RECOVERED, "recovery_s") for e in rec]
        line += f" (detection to training again: median {statistics.median(rs):.2f}s, " \
                f"max {max(rs):.2f}s)"
    lines.append(line + f"; lost steps {b['lost_steps']}")
    lines += [f"  {line}" for line in recovery_sources(rec)]
    commits = _of(events, Event.CHECKPOINT_COMMITTED)
    failed = _of(events, Event.CHECKPOINT_FAILED)
    line = f"checkpoints: {len(commits)} committed, {len(failed)} not committed"
    if commits:
        stall = statistics.median(get_field(e, Event.CHECKPOINT_COMMITTED, "stall_s")
                                  for e in commits)
        persist = statistics.median(get_field(e, Event.CHECKPOINT_COMMITTED, "persist_s")
                                    for e in commits)
        line += f"; median stall {stall:.3f}s, median persist {persist:.2f}s"
    lines.append(line)
    check = model_check(b, events)
    if check:
        i = check["inputs"]
        lines.append(
            f"model check (docs/availability.md; start-up, shutdown and waits left out): measured "
            f"{100 * check['measured']:.1f}%; modelled {100 * check['modelled_first_order']:.1f}% "
            f"(failures one at a time) or {100 * check['modelled_poisson']:.1f}% (Poisson in "
            f"wall time: failures may hit recoveries) from this run's job MTBF "
            f"{i['job_mtbf_s']:.1f}s, stall {i['stall_s']:.3f}s per {i['interval_s']:.1f}s of "
            f"work, {i['recovery_s']:.2f}s down per failure, "
            f"{100 * i['peer_fraction']:.0f}% recovered from peers")
    choices = _of(events, Event.CHECKPOINT_INTERVAL)
    if choices:
        c = choices[-1]
        steps = get_field(c, Event.CHECKPOINT_INTERVAL, "interval_steps")
        lines.append(f"checkpoint interval (auto): {steps} steps, last chosen at step "
                     f"{get_field(c, Event.CHECKPOINT_INTERVAL, 'step')}: "
                     f"{get_field(c, Event.CHECKPOINT_INTERVAL, 'reason')}")
    return "\n".join(line.rstrip() for line in lines)


def _time_of_step(pts: List[tuple], step: int, not_after: float) -> float:
    """Where the drawn step curve (time, step), interpolated between its points, last reached
    `step` in a segment starting before `not_after`; `not_after` if it never did."""
    best = not_after
    for (x0, s0), (x1, s1) in zip(pts, pts[1:]):
        if x0 > not_after:
            break
        if s0 < step <= s1:
            best = x0 + (x1 - x0) * (step - s0) / (s1 - s0)
        elif s0 == step:
            best = x0
    return best


def _step_point(e: Dict[str, Any]):
    """(time, step) of an event that says which step the job had completed when: the time of
    the step itself where the event has it, else the event's."""
    kind, step_t = e["event"], None
    if kind == Event.PROGRESS:
        step = get_field(e, Event.PROGRESS, "step")
        step_t = get_field(e, Event.PROGRESS, "step_t")
    elif kind == Event.FAILURE_DETECTED:
        step = get_field(e, Event.FAILURE_DETECTED, "step")
        step_t = get_field(e, Event.FAILURE_DETECTED, "last_step_t")
    elif kind == Event.JOB_END:
        step = get_field(e, Event.JOB_END, "step")
        step_t = get_field(e, Event.JOB_END, "last_step_t")
    elif kind == Event.GROUP_FORMED:
        step = get_field(e, Event.GROUP_FORMED, "step")
    else:
        return None
    return None if step is None else (step_t or e["t"], step)


class GapAxis:
    """The timeline's x: seconds since the first attempt started, with each gap between attempts
    longer than `limit` (5% of the attempts' own time, at least 2 s) drawn `limit` wide. A
    rerun a day later would otherwise squeeze every attempt into the picture's edges."""

    def __init__(self, runs: List[accounting.Attempt], t0: float):
        self.t0 = t0
        active = sum(max(0.0, a.end - a.start) for a in runs)
        self.limit = max(2.0, 0.05 * active)
        self.gaps = [(p.end, n.start) for p, n in zip(runs, runs[1:])
                     if n.start - p.end > self.limit]

    def __call__(self, t: float) -> float:
        t = float(t)
        x = t - self.t0
        for g0, g1 in self.gaps:
            if t >= g1:
                x -= (g1 - g0) - self.limit
            elif t > g0:
                x -= (t - g0) * (1.0 - self.limit / (g1 - g0))
        return x


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}min"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def world_line(runs: List[accounting.Attempt], rel) -> Tuple[List[float], List[float]]:
    """(x, workers) of the workers line: each generation's size while it runs, 0 between
    generations, and a break (NaN) between attempts, so nothing is drawn across a gap."""
    xs: List[float] = []
    ys: List[float] = []
    for i, a in enumerate(runs):
        if i and xs:
            xs.append(xs[-1])
            ys.append(float("nan"))
        for sp in a.spans:
            w = sp.world_size if sp.phase == "running" else 0
            xs += [rel(sp.t0), rel(sp.t1)]
            ys += [w, w]
    return xs, ys


def step_curve(events: List[Dict[str, Any]], runs: List[accounting.Attempt],
               rel) -> List[Tuple[float, float]]:
    """(x, step) of the completed-step curve, with a break (NaN) between attempts."""
    pts = sorted(p for p in map(_step_point, events) if p is not None)
    out: List[Tuple[float, float]] = []
    bounds = [a.start for a in runs[1:]]
    for t, step in pts:
        while bounds and t >= bounds[0]:
            if out:
                out.append((out[-1][0], float("nan")))
            bounds.pop(0)
        out.append((rel(t), step))
    return out


def plot_timeline(events: List[Dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    runs = accounting.attempts(events)
    t0 = runs[0].start if runs else float(events[0]["t"])
    rel = GapAxis(runs, t0)
    fig, (ax_w, ax_s) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True,
                                     gridspec_kw={"height_ratios": [1, 1.3]})
    seen_phases = set()
    for a in runs:
        for sp in a.spans:
            for ax in (ax_w, ax_s):
                ax.axvspan(rel(sp.t0), rel(sp.t1), color=COLORS[sp.phase], alpha=0.35, lw=0)
            seen_phases.add(sp.phase)
    for prev, nxt in zip(runs, runs[1:]):
        if nxt.start > prev.end:
            for ax in (ax_w, ax_s):
                ax.axvspan(rel(prev.end), rel(nxt.start), facecolor="none", hatch="//",
                           edgecolor="#90a4ae", lw=0)
            if (prev.end, nxt.start) in rel.gaps:  # drawn shortened: say how long it was
                ax_s.annotate(f"{_duration(nxt.start - prev.end)}\nbetween attempts",
                              ((rel(prev.end) + rel(nxt.start)) / 2, 0.5),
                              xycoords=("data", "axes fraction"), ha="center", va="center",
                              fontsize=7, color="#546e7a",
                              bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})

    # world size: the size of each generation while it runs, 0 between generations
    xs, ys = world_line(runs, rel)
    ax_w.plot(xs, ys, color="#1b5e20", lw=2, drawstyle="steps-post", label="workers training")
    top = max([get_field(e, Event.GROUP_FORMED, "world_size", 0)
               for e in _of(events, Event.GROUP_FORMED)] + [1])
    ax_w.set_ylim(0, top + 1)
    ax_w.set_ylabel("workers")

    # steps: at each group formation, progress line, failure and job end (with the time of the
    # step itself where the event has it), so a rollback shows as a drop
    pts = step_curve(events, runs, rel)
    if pts:
        ax_s.plot([p[0] for p in pts], [p[1] for p in pts], color="#1b5e20", lw=1.5,
                  marker=".", ms=3, label="completed step")
    ax_s.set_ylabel("step")
    ax_s.set_xlabel("seconds since the job started" + (
        " (gaps between attempts shortened, their length written on them)" if rel.gaps else ""))

    # Few events: each is labelled where it happens; many: colours and the legend say it all.
    n_fail = len(_of(events, Event.FAILURE_DETECTED))
    n_rec = len(_of(events, Event.RECOVERED))
    labelled = set()

    def once(key, label):
        if key in labelled:
            return None
        labelled.add(key)
        return label

    for e in events:
        x = rel(e["t"])
        if e["event"] == Event.FAILURE_DETECTED:
            kind = get_field(e, Event.FAILURE_DETECTED, "kind", "")
            color = FAILURE_COLORS.get(kind, "#b71c1c")
            label = once(("fail", kind), f"{kind.replace('_', ' ')} detected")
            ax_w.axvline(x, color=color, ls="--", lw=1.2, label=label)
            ax_s.axvline(x, color=color, ls="--", lw=1.2)
            if n_fail <= 8:
                ranks = get_field(e, Event.FAILURE_DETECTED, "ranks") or []
                ax_w.annotate(f"{kind.replace('_', ' ')}" + (f" {ranks}" if ranks else ""),
                              (x, top + 0.9), fontsize=7, va="top", ha="right", color=color,
                              bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        elif e["event"] == Event.PAUSING:
            ax_w.annotate(get_field(e, Event.PAUSING, "reason", "pause"), (x, top + 0.9),
                          fontsize=7, va="top", ha="left", color="#e65100",
                          bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        elif e["event"] == Event.CHECKPOINT_COMMITTED:
            # at the time its step was trained (the commit itself comes after the persist)
            step = get_field(e, Event.CHECKPOINT_COMMITTED, "step")
            at = _time_of_step(pts, step, x)
            ax_s.plot([at], [step], marker="v", color="#1565c0", ms=6, ls="none",
                      label=once("ckpt", "checkpoint committed"))
        elif e["event"] == Event.RECOVERED:
            world = get_field(e, Event.RECOVERED, "world_size")
            ax_w.plot([x], [world], marker="o", color="#e65100", ms=7, ls="none",
                      label=once("rec", "recovered (first step after)"))
            if n_rec <= 8:
                r = get_field(e, Event.RECOVERED, "recovery_s")
                src = get_field(e, Event.RECOVERED, "source")
                lost = get_field(e, Event.RECOVERED, "lost_steps")
                ax_w.annotate(f"{r:.1f}s, {src}, lost {lost}", (x, world),
                              textcoords="offset points",
                              xytext=(4, -12), fontsize=7, color="#e65100")
    handles, labels = [], []
    for ax in (ax_w, ax_s):
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    handles += [Patch(color=COLORS[p], alpha=0.35, label=PHASE_LABELS[p]) for p in COLORS
                if p in seen_phases]
    labels += [PHASE_LABELS[p] for p in COLORS if p in seen_phases]
    if len(runs) > 1:
        handles.append(Patch(facecolor="none", hatch="//", edgecolor="#90a4ae"))
        labels.append("between attempts (no workers)")
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_report(run_dir: str, out: TextIO = sys.stdout) -> int:
    try:
        events = accounting.run_events(run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not _of(events, Event.JOB_START):
        print(f"error: {run_dir!r}: events.jsonl holds no job_start: nothing to report",
              file=sys.stderr)
        return 2
    b = accounting.breakdown(events)
    print(format_table(b, events, run_dir), file=out)
    path = os.path.join(run_dir, "timeline.png")
    g = b["goodput"]
    title = (f"{os.path.basename(os.path.abspath(run_dir))}: goodput "
             f"{'-' if g is None else f'{100 * g:.1f}%'} of {b['wall_s']:.0f}s, "
             f"{b['failures']} failure(s), {b['lost_steps']} lost step(s)")
    plot_timeline(events, path, title)
    print(f"timeline: {path}", file=out)
    return 0


def recovery_sources(rec: List[Dict[str, Any]]) -> List[str]:
    """One line per state source of the recoveries (peer, memory, checkpoint): how many, the
    steps they lost, and the medians of release (detection -> survivors out of the failed
    group) and transfer time, with the bytes moved."""
    out = []
    by: Dict[str, List[Dict[str, Any]]] = collections.defaultdict(list)
    for e in rec:
        by[str(get_field(e, Event.RECOVERED, "source"))].append(e)
    for source, es in sorted(by.items()):
        lost = sum(get_field(e, Event.RECOVERED, "lost_steps") for e in es)
        line = f"from {source}: {len(es)}, lost steps {lost}"
        rel = [v for v in (get_field(e, Event.RECOVERED, "release_s") for e in es) if v is not None]
        if rel:
            line += f", release median {statistics.median(rel):.3f}s"
        tr = [v for v in (get_field(e, Event.RECOVERED, "transfer_s") for e in es) if v is not None]
        if tr:
            moved = sum(get_field(e, Event.RECOVERED, "transfer_bytes", 0) or 0 for e in es)
            line += f", transfer median {statistics.median(tr):.3f}s"
            if moved:
                size = f"{moved / 1e6:.1f} MB" if moved >= 100_000 else f"{moved / 1e3:.1f} kB"
                line += f" ({size} in all)"
        out.append(line)
    return out
