"""Where a recovery's time went: the `phases` of the `recovered` event.

From detection (the controller learns of the loss) to the first completed step, in order:

  settle_s      survivors leave the failed group and report their last step
  replace_s     waiting for replacements (or spares) to be ready to join
  form_s        the new generation forms; its parts are the slowest member's:
    leave_s       tear down the old group (a survivor) or nothing (a newcomer)
    rendezvous_s  every member arrives and the process groups are created
    build_s       a member without a state builds its model and optimizer
    transfer_s    the state is taken from its source (the holders' replica, in-memory
                  snapshots, a checkpoint); a member that holds it already takes nothing
    wrap_s        the model is wrapped (DDP) and the generation's saver opened
  first_step_s  the first step of the new generation, until every rank reported it

settle_s + replace_s + form_s + first_step_s = recovery_s (rounding aside). Detection itself (the
loss happening -> the controller knowing) happens before `recovery_s` starts: the benchmark
measures it from the injected kill (scripts/bench_recovery.py).
"""

from __future__ import annotations

from typing import Dict, Optional

JOIN_PARTS = ("leave_s", "rendezvous_s", "build_s", "transfer_s", "wrap_s")


def formed(t0: float, settled_at: Optional[float], planned_at: Optional[float], now: float,
           join_parts: Dict[str, float]) -> Dict[str, float]:
    """The phases up to a formed generation (`now`), detected at `t0`."""
    settled = settled_at if settled_at is not None else t0
    planned = planned_at if planned_at is not None else settled
    phases = {"settle_s": settled - t0, "replace_s": planned - settled, "form_s": now - planned}
    phases.update({k: join_parts.get(k, 0.0) for k in JOIN_PARTS})
    return {k: round(max(0.0, v), 3) for k, v in phases.items()}


def first_step(phases: Dict[str, float], formed_t: float, step_t: float) -> Dict[str, float]:
    """`phases` with the first step's part added (it completed at `step_t`)."""
    return dict(phases, first_step_s=round(max(0.0, step_t - formed_t), 3))
