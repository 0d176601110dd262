"""The benchmark tables of docs/benchmarks.md come from the benchmarks' JSON (scripts/bench_tables.py)."""

import json
import os
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unit

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_tables  # noqa: E402
import benchlib  # noqa: E402


def test_the_docs_tables_are_the_stored_json_rendered():
    """No hand-copied figure: rendering docs/bench/*.json into the doc changes nothing."""
    with open(bench_tables.DOC) as f:
        doc = f.read()
    assert bench_tables.render(doc) == doc, "run python scripts/bench_tables.py"
    for name in bench_tables.TABLES:
        assert f"<!-- bench:{name} -->" in doc and f"<!-- /bench:{name} -->" in doc


def test_a_table_is_rebuilt_from_its_json_and_a_peer_that_failed_says_why(tmp_path):
    fig = benchlib.figure([0.3, 0.2, 0.25])
    assert fig == {"median": 0.25, "spread": [0.2, 0.3], "all": [0.3, 0.2, 0.25]}
    assert benchlib.goal(0.05, "<=", 0.5) == {"value": 0.05, "goal": "<= 0.5", "met": True}
    assert benchlib.goal(None, ">=", 1)["met"] is None
    phases = {k: 0.01 for k in ("settle_s", "replace_s", "form_s", "first_step_s",
                                "rendezvous_s", "transfer_s", "wrap_s")}
    recovery = {
        "machine": benchlib.machine(), "repeats": 3,
        "sides": {"ours": {"recovery_s": fig, "lost_steps_max": 0, "phases_median": phases,
                           "runs": [{"detect_s": 0.03}] * 3},
                  "torchft": {"recovery_s": None, "error": "RuntimeError: no lighthouse"}},
        "goals": {"ours_vs_torchft": benchlib.goal(None, "<=", 0.5)}}
    (tmp_path / "recovery.json").write_text(json.dumps(recovery))
    doc = "intro\n<!-- bench:recovery -->\nold figures\n<!-- /bench:recovery -->\nafter\n"
    out = bench_tables.render(doc, str(tmp_path))
    assert "old figures" not in out and out.startswith("intro\n") and out.endswith("after\n")
    assert "0.25 s (0.20-0.30)" in out
    assert "not measured: RuntimeError: no lighthouse" in out
    assert "ours_vs_torchft <= 0.5: None (not measured)" in out
    assert bench_tables.render(out, str(tmp_path)) == out  # stable
