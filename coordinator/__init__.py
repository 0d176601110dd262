"""Elastic training coordinator: launches data-parallel PyTorch jobs as Ray actors."""

import time as _time

STARTED_T = _time.time()  # when the command started, about (summary.json's startup_s)
