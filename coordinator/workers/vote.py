"""The stop vote, agreed by all ranks after every step (see StopVote)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

# Stop requests, agreed by all ranks after every step (a MAX all-reduce of each rank's request), so
# every rank stops after the same step whichever of them heard the controller first.
# The vote's second element carries checkpoint requests (`checkpoint.interval_steps: auto`): the
# highest request number any rank has heard. Every rank saves after the step where the agreed number
# first exceeds the last one it saved for; that count is reset on every join, so it is the same on
# all members of a generation and they save at the same step.


class StopVote:
    """The stop vote, agreed by all ranks after every step (see the top of this module). The vote
    of step k runs asynchronously during step k+1 and is read after it, so its latency hides
    behind compute; every rank reads the same result after the same step. Besides (stop, save)
    it carries the saver's `flags` (is a save in flight, does storage answer it), so a save
    stuck on storage that stopped answering is given up at the same step on every rank, whether
    or not another save is due."""

    SIZE = 4  # stop, save, save in flight, save answered

    def __init__(self, group):
        self._group = group  # None: the default (training) group, gloo
        self._buf = torch.zeros(self.SIZE, dtype=torch.int64)
        self._work = None

    def cast(self, votes: Tuple[int, ...], again: bool) -> Tuple[int, ...]:
        """Read the previous step's agreed votes (all 0 after the first step of a call); then
        cast this step's `votes`, unless no step follows (`again` false)."""
        agreed: Tuple[int, ...] = (0,) * self.SIZE
        if self._work is not None:
            self._work.wait()
            agreed = tuple(int(v) for v in self._buf)
        for i, v in enumerate(votes):
            self._buf[i] = int(v)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group,
                                     async_op=True) if again else None
        return agreed

    def finish(self) -> None:
        """Wait for a vote still in flight (the loop stopped before reading it)."""
        if self._work is not None:
            self._work.wait()
