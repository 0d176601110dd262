"""The rank loop: what every rank runs, under the coordinator, under torchrun or in a test.

Each step takes this rank's slice of the global batch of `state.step` (the data cursor), runs the
pure `train_step` on it with this rank's loss weighting, and counts the step. Whatever else a caller
does per step (the coordinator's stop vote, checkpoints and step reports; a test's loss all-reduce;
a benchmark's log) is an `after_step` hook, so the benchmarks' baselines run the product's loop.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Set

import torch

from train import data as data_lib
from train.prefetch import Prefetcher
from train.state import TrainState
from train.step import train_step

# after_step(step, weighted_loss, t, duration_s) -> stop: called once per completed step.
AfterStep = Callable[[int, float, float, float], bool]


class StepError(RuntimeError):
    """A RuntimeError raised inside step `step` (1-based: the step being taken), such as a
    collective failing because a peer died or hung. The state's step is still `step - 1`, but the
    model and optimizer may be partly updated: the caller must not train on."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(step, cause)  # args as given, so it pickles
        self.step, self.cause = step, cause

    def __str__(self) -> str:
        return f"step {self.step}: {self.cause}"


def _to(batch, device: torch.device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_steps(state: TrainState, *, seed: int, global_batch_size: int, world_size: int,
              rank: int, device: torch.device, until_step: int,
              after_step: Optional[AfterStep] = None, skip: Optional[Set[int]] = None,
              prefetch: bool = False) -> None:
    """Train `state` as `rank` of `world_size` until `state.step == until_step`, or until
    `after_step` returns True.

    `after_step(step, weighted_loss, t, duration_s)` runs after every completed step (the
    optimizer has stepped and `state.step == step`): `weighted_loss` is this rank's mean loss times
    its share of the global batch (summed over the ranks: the global-batch mean loss), `t` the unix
    time the step ended, `duration_s` the seconds since it began (batch building included). It
    returns whether to stop after this step; what it raises propagates unchanged. A RuntimeError
    inside the step itself is raised as `StepError`.

    `skip`: steps (1-based) to skip, such as those found non-finite before a rollback (see
    `train_step`). A step found non-finite now is skipped too and added to `skip`, so the caller
    tells the two apart by what it passed in; a skipped step reports a NaN loss.

    `state.recipe` says how each step is computed (micro-batches, precision, clipping: see
    `train.step.Recipe`); `state.grad_norm` holds the last step's gradient norm.

    `prefetch`: build the next step's batch on a background thread while this step runs
    (train.prefetch); the batches, and so the weights, are the same either way."""
    task, recipe = state.task, state.recipe

    def build(step: int):
        return data_lib.local_micro_batches(task, seed, step, global_batch_size, world_size,
                                            rank, recipe.micro_batch_size)

    if not prefetch:
        _run(state, build, global_batch_size, world_size, rank, device, until_step,
             after_step, skip)
        return
    with Prefetcher(build, until_step) as ahead:
        _run(state, ahead.get, global_batch_size, world_size, rank, device, until_step,
             after_step, skip)


def _run(state: TrainState, build: Callable[[int], object], global_batch_size: int,
         world_size: int, rank: int, device: torch.device, until_step: int,
         after_step: Optional[AfterStep], skip: Optional[Set[int]]) -> None:
    task, recipe = state.task, state.recipe
    scale = data_lib.loss_scale(global_batch_size, world_size, rank)
    share = data_lib.share(global_batch_size, world_size, rank)
    while state.step < until_step:
        t0 = time.time()
        batch = build(state.step)
        if isinstance(batch, dict):
            batch = _to(batch, device)
        else:
            batch = [(_to(b, device), w) for b, w in batch]
        replay = skip is not None and state.step + 1 in skip
        try:
            loss, applied, state.grad_norm = train_step(
                state.model, state.optimizer, state.scheduler, task.loss, batch, scale,
                skip=replay, recipe=recipe)
        except RuntimeError as e:
            raise StepError(state.step + 1, e) from e
        state.step += 1
        if not applied:
            loss = float("nan")
            if skip is not None:
                skip.add(state.step)
        now = time.time()
        if after_step is not None and after_step(state.step, loss * share, now, now - t0):
            return
