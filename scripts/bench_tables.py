"""Regenerate the figure tables of docs/benchmarks.md from the benchmarks' JSON (docs/bench/).

`make bench` writes each benchmark's JSON object to docs/bench/NAME.json and then runs this; each
table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in docs/benchmarks.md, so no
figure there is copied by hand. A JSON file that is missing leaves its table as it is.

    python scripts/bench_tables.py [--check]     (--check: exit 1 if a table is out of date)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BENCH_DIR = os.path.join(ROOT, "docs", "bench")


def _s(x: Optional[float], unit: str = " s", digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def _met(g: Dict) -> str:
    if g.get("met") is None:
        return "not measured"
    return "met" if g["met"] else "**not met**"


def _spread(fig: Dict, unit: str = " s", digits: int = 2) -> str:
    lo, hi = fig["spread"]
    return f"{_s(fig['median'], unit, digits)} ({lo:.{digits}f}-{hi:.{digits}f})"


def _machine(m: Dict) -> str:
    parts = [f"{m.get('cores')} cores", f"torch {m.get('torch')}", f"ray {m.get('ray')}"]
    parts += [f"{k.replace('_', '-')} {v}" for k, v in m.items()
              if k not in ("cores", "torch", "ray") and v]
    return ", ".join(parts)


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def overhead(j: Dict) -> List[str]:
    sps = j["steps_per_s"]
    names = {"ours": "ours (coordinator on Ray)",
             "ours_no_spare": "ours, `scaling.spare_workers=0`",
             "torchrun": "plain DDP under torchrun",
             "torchft": "torchft (4 replica groups of 1, Lighthouse)"}
    rows = []
    for k, label in names.items():
        if k not in sps:
            continue
        ratio = "1" if k == "ours" else f"{sps['ours']['median'] / sps[k]['median']:.3f}"
        rows.append([label, _spread(sps[k], "", 2), ratio])
    g = j["goals"]
    return table(["", "steps/s, median (spread)", "ours / this"], rows) + [
        "", f"Goals: ours / torchrun {g['vs_torchrun']['goal']}: {g['vs_torchrun']['value']} "
            f"({_met(g['vs_torchrun'])}); ours / torchft {g['vs_torchft']['goal']}: "
            f"{g['vs_torchft']['value']} ({_met(g['vs_torchft'])})"
            + (f"; ours without the spare / torchrun {g['no_spare_vs_torchrun']['goal']}: "
               f"{g['no_spare_vs_torchrun']['value']} ({_met(g['no_spare_vs_torchrun'])})"
               if "no_spare_vs_torchrun" in g else "") + ". Same weights as torchrun: "
            f"{'yes' if j['same_weights'] else 'no'}. World {j['world']}, {j['steps']} steps, "
            f"global batch {j['global_batch_size']}, {j['repeats']} interleaved repeats; "
            f"{_machine(j['machine'])}."]


def prefetch(j: Dict) -> List[str]:
    rows = [[str(j["world"]), _s(j["step_ms_without_cost"], " ms", 1),
             f"{j['batch_cost_ms']:.1f} ms", _spread(j["without"], " steps/s", 1),
             _spread(j["with"], " steps/s", 1), f"**{j['ratio']:.2f}** ({_met(j['goals']['ratio'])})"]]
    return table(["world", "step without the cost", "a rank's batch costs", "without prefetch",
                  "with prefetch", f"ratio ({j['goals']['ratio']['goal']})"], rows) + [
        "", f"{j['repeats']} interleaved repeats; same weights with and without: "
            f"{'yes' if j['same_weights'] else 'no'}; {_machine(j['machine'])}."]


RECOVERY_SIDES = {
    "ours": "ours, defaults (a spare takes rank 1)",
    "ours_no_spare": "ours, `scaling.spare_workers=0` (a replacement process starts)",
    "ours_shrink_first": "ours, `failure.replace=false`, no spare (3 survivors go on)",
    "torchft": "torchft (4 replica groups of 1; the killed one restarted at once)",
    "ray_train": "Ray Train V2 `TorchTrainer` (every worker restarted)",
}
PHASES = ("settle_s", "replace_s", "form_s", "first_step_s")


def recovery(j: Dict) -> List[str]:
    sides = j["sides"]
    rows = []
    for k, label in RECOVERY_SIDES.items():
        if k not in sides:
            continue
        s = sides[k]
        if s.get("recovery_s") is None:
            rows.append([label, f"not measured: {s.get('error')}", "-", "-", "-"])
            continue
        ft = (sides.get("torchft") or {}).get("recovery_s")
        rows.append([label, _spread(s["recovery_s"]), str(s["lost_steps_max"]),
                     _spread(s["rejoin_s"]) if "rejoin_s" in s else "-",
                     f"{s['recovery_s']['median'] / ft['median']:.3f}" if ft else "-"])
    out = table(["", "kill to next step, median (spread)", "lost steps (worst)",
                 "kill to the restarted one training", "/ torchft"], rows)
    out += ["", "Where our time went (medians, seconds; `phases` of the `recovered` event):", ""]
    prow = []
    for k in ("ours", "ours_no_spare", "ours_shrink_first"):
        ph = sides.get(k, {}).get("phases_median")
        if ph:
            detect = sorted(r["detect_s"] for r in sides[k]["runs"])[len(sides[k]["runs"]) // 2]
            prow.append([k, f"{detect:.3f}"] + [f"{ph[p]:.3f}" for p in PHASES]
                        + [f"{ph['rendezvous_s']:.3f} / {ph['transfer_s']:.3f} / "
                           f"{ph.get('wrap_s', ph.get('prime_s', 0.0)):.3f}"])
    # (`prime_s` in figures taken before DDP's buckets were fixed without a primed step)
    out += table(["mode", "detect", "settle", "replace", "form", "first step",
                  "form: rendezvous / transfer / wrap (prime before)"], prow)
    g = j["goals"]
    out += ["", "Goals: " + "; ".join(f"{k} {v['goal']}: {v['value']} ({_met(v)})"
                                       for k, v in g.items())
            + f". {j['repeats']} interleaved repeats; {_machine(j['machine'])}."]
    return out


def checkpoint(j: Dict) -> List[str]:
    rows = []
    for r in j["results"]:
        for h, b in r["by_hash"].items():
            first = h == r["hash"]
            rows.append([f"{r['target']}, {h}" + (" (default)" if first else ""),
                         _s(r["sync_save_s"]) if first else "", _s(b["async_stall_s"], " s", 4),
                         f"{b['stall_ratio']:.4f}", f"{b['stall_vs_memcpy']:.3f}",
                         _s(b["persist_s"]), _s(r["raw_write_s"]) if first else "",
                         f"{b['throughput_ratio']:.2f}", f"{b['verify_GBps']:.1f} GB/s",
                         _s(b["training_slowdown_s"])])
    out = table(["target", "sync save", "async stall", "stall ratio (<= 0.05)",
                 "stall / memcpy (<= 2)", "persist", "raw write", "throughput ratio (>= 0.8)",
                 "verify", "training slowdown"], rows)
    for r in j["results"]:
        met = ", ".join(f"{k} {'met' if v else '**not met**'}" for k, v in r["met"].items())
        out += ["", f"{r['target']}: {r['bytes'] / 1e9:.2f} GB, median of {r['repeats']} "
                    f"interleaved runs, a step of {r['step_s']:.2f} s; {met}. "
                    f"The whole copy at the step boundary (`stage_beside_step: false`): "
                    f"{r['boundary_copy_s']:.3f} s (a memcpy: {r['memcpy_s']:.3f} s). "
                    f"Persist and raw write both run beside the same training steps (a raw "
                    f"write alone: {r['raw_write_idle_s']:.2f} s); a bare raw write beside "
                    f"them slows the steps by {r['raw_write_slowdown_s']:.2f} s."]
    out += ["", f"{_machine(j['machine'])}."]
    return out


def snapshots(j: Dict) -> List[str]:
    """bench_overhead.py --parallelism fsdp: in-memory snapshots every step against none."""
    g = j["goals"]["ratio"]
    out = table(["FSDP2, world " + str(j["world"]), "steps/s, median (spread)", "with / without"],
                [["snapshots every step (default)", _spread(j["with"], "", 2),
                  f"**{j['ratio']:.3f}** ({_met(g)}; goal {g['goal']})"],
                 ["snapshots off", _spread(j["without"], "", 2), "1"]])
    return out + ["", f"Peak snapshot memory per rank: {j['memory_snapshot_bytes'] / 1e6:.2f} MB "
                  f"(its own shard at 2 steps and its buddy's at 2). Same weights with and "
                  f"without: {'yes' if j['same_weights'] else 'no'}. {j['steps']} steps, global "
                  f"batch {j['global_batch_size']}, {j['repeats']} interleaved repeats; "
                  f"{_machine(j['machine'])}."]


def recovery_fsdp(j: Dict) -> List[str]:
    """bench_recovery.py --parallelism fsdp (and hsdp: the same table)."""
    kind = "HSDP, 2 shard groups of 2" if j.get("parallelism") == "hsdp" else "FSDP2, 4 workers"
    labels = {"ours_memory": "ours, snapshots in memory (default)",
              "ours_checkpoint_only": "ours, `checkpoint.memory_interval_steps=0`",
              "ray_train": "Ray Train V2 `TorchTrainer` (every worker restarted)"}
    rows = []
    for name, label in labels.items():
        side = j["sides"].get(name)
        if side is None:
            continue
        if side.get("recovery_s") is None:
            rows.append([label, f"not measured: {side.get('error', '')[:120]}", "-", "-", "-"])
            continue
        rel = side.get("release_s")
        src = {r.get("source") for r in side.get("runs", []) if r.get("source")}
        rows.append([label, _spread(side["recovery_s"]), str(side["lost_steps_max"]),
                     _spread(rel, " s", 3) if rel else "-", ", ".join(sorted(src)) or "-"])
    goals = "; ".join(f"{k} {v['goal']}: {v['value']} ({_met(v)})" for k, v in j["goals"].items())
    return table([kind, "kill to next step, median (spread)", "lost steps (worst)",
                  "release", "state from"], rows) + [
        "", f"Goals: {goals}. Checkpoint every {j['job']['checkpoint_interval']} steps, kill "
            f"after step {j['job']['kill_after_step']}, {j['repeats']} interleaved repeats; "
            f"{_machine(j['machine'])}."]


SCALE_SIDES = {"ours_ddp": "ours, DDP (a spare takes the rank)", "ours_fsdp": "ours, FSDP2",
               "ours_hsdp": "ours, HSDP 2x2", "torch_ddp": "plain torch DDP (no failure)",
               "torch_fsdp": "plain torch FSDP2 (no failure)", "torchft": "torchft",
               "ray_train": "Ray Train V2", "raw_gloo": "a raw gloo send of the state"}


def scale(j: Dict) -> List[str]:
    """bench_scale.py: per state size, each side's memory, recovery and speed."""
    rows = []
    for size, r in j["sizes"].items():
        for k, label in SCALE_SIDES.items():
            s = r["sides"].get(k)
            if s is None:
                continue
            if "error" in s:
                rows.append([size, label, f"not measured: {s['error'][:120]}", "-", "-", "-",
                             "-"])
                continue
            rss = s.get("peak_rss_gb")
            phases = s.get("phases") or {}
            rows.append([
                size, label,
                f"{max(rss):.2f}" if rss else "-",
                _s(s.get("recovery_s")),
                (f"form {phases.get('form_s', 0):.2f} (transfer {phases.get('transfer_s', 0):.2f})"
                 f", first step {phases.get('first_step_s', 0):.2f}") if phases else "-",
                _s(s.get("transfer_gbps") or s.get("gbps"), " GB/s"),
                _s(s.get("steps_per_s"), "", 3)])
    out = table(["state", "side", "peak RSS per worker (GB)", "kill to next step",
                 "where (ours)", "transfer", "steps/s"], rows)
    out.append("")
    for size, r in j["sizes"].items():
        out.append(f"Goals at {size}: " + "; ".join(
            f"{k} {v['goal']}: {v['value']} ({_met(v)})" if "goal" in v
            else f"{k}: {v['value']}" for k, v in r["goals"].items()) + ".")
    out.append(f"One run per side; {_machine(j['machine'])}.")
    return out


TABLES: Dict[str, Callable[[Dict], List[str]]] = {
    "scale": scale,
    "overhead": overhead, "prefetch": prefetch, "recovery": recovery, "checkpoint": checkpoint,
    "snapshots": snapshots, "recovery_fsdp": recovery_fsdp, "recovery_hsdp": recovery_fsdp}


def render(doc: str, bench_dir: str = BENCH_DIR) -> str:
    for name, make in TABLES.items():
        path = os.path.join(bench_dir, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            body = "\n".join(make(json.load(f)))
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)",
                             re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{DOC} has no <!-- bench:{name} --> block for {path}")
        doc = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), doc)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    a = p.parse_args()
    with open(DOC) as f:
        doc = f.read()
    new = render(doc)
    if a.check:
        if new != doc:
            print(f"{DOC} is out of date: run python scripts/bench_tables.py", file=sys.stderr)
            sys.exit(1)
        return
    if new != doc:
        with open(DOC, "w") as f:
            f.write(new)
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
