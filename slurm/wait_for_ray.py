"""Wait until a Ray cluster has N alive nodes: `python slurm/wait_for_ray.py ADDRESS N TIMEOUT_S`.
Exit 0 when they are there, 1 with a one-line reason after TIMEOUT_S."""

import logging
import sys
import time


def main() -> int:
    address, want, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            break
        except Exception as e:  # the head is not up yet
            if time.monotonic() > deadline:
                print(f"wait_for_ray: no Ray head at {address} after {timeout_s:g}s: {e}",
                      file=sys.stderr)
                return 1
            time.sleep(1)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= want:
                print(f"wait_for_ray: {alive} of {want} nodes joined {address}")
                return 0
            if time.monotonic() > deadline:
                print(f"wait_for_ray: only {alive} of {want} nodes joined {address} within "
                      f"{timeout_s:g}s (RAY_START_TIMEOUT_S); see the srun steps' output",
                      file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
