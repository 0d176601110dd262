"""Goodput analysis, apart from the runtime: where a run's time went (`accounting`), the report
and timeline (`report`), the availability model (`availability`) and its Monte Carlo
(`simulate`). Analysis only: it reads `events.jsonl` and never imports Ray or torch, so a run
directory can be examined anywhere."""
