"""Steps/s of our coordinator vs plain DDP launched with torchrun: same model, world and batch.

    .venv/bin/python scripts/bench_overhead.py [--world 4] [--steps 400] [--repeats 3]

Runs both alternately `--repeats` times in one go (this machine is noisy), takes the median of each,
and prints one JSON object: steady-state steps/s (after the same warm-up) of both, and
`ratio` = ours / torchrun (goal >= 0.97). Progress goes to stderr.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours(world: int, steps: int, gbs: int, run_dir: str) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    subprocess.run([sys.executable, "-m", "coordinator", "run", "configs/local_cpu.yaml", "chaos.events=[]",
                    "ray.simulated_nodes=0", f"scaling.min_workers={world}",
                    f"scaling.max_workers={world}", f"train.steps={steps}",
                    f"train.global_batch_size={gbs}", "checkpoint.interval_steps=0",
                    f"run.dir={run_dir}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def torchrun(world: int, steps: int, gbs: int, out: str) -> dict:
    torchrun_bin = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun_bin, "--standalone", f"--nproc-per-node={world}",
                    "scripts/ddp_baseline.py", f"--steps={steps}",
                    f"--global-batch-size={gbs}", f"--out={out}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    with open(out) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    ours_rates, base_rates, digests = [], [], set()
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.repeats):
            s = ours(a.world, a.steps, a.global_batch_size, os.path.join(d, f"ours{i}"))
            b = torchrun(a.world, a.steps, a.global_batch_size, os.path.join(d, f"base{i}.json"))
            ours_rates.append(s["steps_per_s"])
            base_rates.append(b["steps_per_s"])
            digests.update([s["weights_digest"], b["weights_digest"]])
            print(f"repeat {i + 1}/{a.repeats}: ours {s['steps_per_s']:.2f} steps/s, "
                  f"torchrun {b['steps_per_s']:.2f} steps/s", file=sys.stderr)
    o, b = statistics.median(ours_rates), statistics.median(base_rates)
    print(json.dumps({
        "benchmark": "overhead", "world": a.world, "steps": a.steps,
        "global_batch_size": a.global_batch_size, "task": "train.tasks.gpt:TinyGPT",
        "ours_steps_per_s": round(o, 3), "torchrun_steps_per_s": round(b, 3),
        "ours_all": [round(x, 3) for x in ours_rates],
        "torchrun_all": [round(x, 3) for x in base_rates],
        "ratio": round(o / b, 4), "goal": ">= 0.97",
        "same_weights": len(digests) == 1,
    }))


if __name__ == "__main__":
    main()
