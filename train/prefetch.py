"""The next step's local batch, built in the background while the current step runs.

One step ahead, never more (one batch in memory beyond the one in use), and exact: a batch is a
function of the step alone (train.data), so the prefetched batch is the one the step would have
built itself. The prefetcher lives for one `run_steps` call: a re-formed group (another world
size, another rank) starts a new one, and a prefetched batch of a step that does not come (the
loop stopped, the world changed) is dropped unused. An error raised while building a batch is
raised by `get` of that step, on the training thread, as if the step had built it.

`Task.sample` is then called from a second thread while the training thread runs the model: it
must not touch state the model or loss uses (a `sample` that depends only on its arguments, as
the protocol asks, never does). `train.prefetch: false` builds every batch on the training thread.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Tuple


class Prefetcher:
    def __init__(self, build: Callable[[int], Any], until_step: int):
        """`build(step)`: the batch of the step that starts at `state.step == step`."""
        self._build, self._until = build, until_step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: Optional[Tuple[int, Future]] = None
        self.hits = 0  # batches that were ready (or in flight) when their step asked

    def get(self, step: int) -> Any:
        """The batch of `step`; starts building the next one before returning."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == step:
            self.hits += 1
            batch = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            batch = self._build(step)
        if step + 1 < self._until:
            self._next = (step + 1, self._pool.submit(self._build, step + 1))
        return batch

    def close(self) -> None:
        """Drop what is in flight (its result or error is never read) and let the thread go."""
        if self._next is not None:
            self._next[1].cancel()
            self._next = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
