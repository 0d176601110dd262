"""A task with an expensive input pipeline, for scripts/bench_overhead.py --case prefetch.

TinyGPT whose every sample costs `cost_ms` more: a sleep, as a read from remote storage or a
decode in native code costs (neither holds the GIL). Not for training anything.
"""

import time

from train.tasks.gpt import TinyGPT


class SlowGPT(TinyGPT):
    def __init__(self, cost_ms: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.cost_s = cost_ms / 1000.0

    def sample(self, index, seed):
        time.sleep(self.cost_s)
        return super().sample(index, seed)
