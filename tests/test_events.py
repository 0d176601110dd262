"""The event schema: the writer refuses what it does not declare, the one reader tolerates what a
killed driver leaves, and every emit site and every reader in the code matches the schema (read
from the source, so a rewrite of the controller is checked without running it)."""

import ast
import glob
import json
import os

import pytest

from conftest import ROOT
from coordinator.events import (SCHEMA, Event, EventLog, EventSchemaError, events_of, get_field,
                                read_events, validate)

pytestmark = pytest.mark.unit

# ARCHITECTURE.md, "Run directory": the events and fields users and scripts rely on.
CONTRACT = {
    "job_start": {"job", "config_hash"},
    "worker_start": {"rank", "pid", "node_id", "generation"},
    "group_formed": {"generation", "world_size", "ranks", "source", "step"},
    "checkpoint_committed": {"step", "uri", "bytes", "stall_s", "persist_s"},
    "checkpoint_failed": {"step", "reason"},
    "failure_detected": {"kind", "ranks", "pids", "generation", "step"},
    "recovered": {"generation", "world_size", "source", "resumed_step", "lost_steps",
                  "recovery_s"},
    "job_end": {"status", "step"},
}


def _full(kind):
    """A record of `kind` with every required field (values do not matter to the schema)."""
    return {f: 0 for f in SCHEMA[kind].required}


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


# ---- the schema --------------------------------------------------------------------------------

def test_the_schema_covers_every_kind_and_the_contract():
    assert set(SCHEMA) == set(Event) and len(Event) == 21
    for kind, fields in CONTRACT.items():
        assert fields <= set(SCHEMA[Event(kind)].required), kind
    for kind, spec in SCHEMA.items():
        assert not set(spec.required) & set(spec.optional), kind
        assert not spec.fields & {"t", "event"}, kind


def test_kinds_are_strings():
    assert Event.RECOVERED == "recovered" and Event("recovered") is Event.RECOVERED
    assert f"{Event.JOB_END}" == str(Event.JOB_END) == "job_end"
    assert json.dumps({"event": Event.JOB_END}) == '{"event": "job_end"}'


# ---- the writer --------------------------------------------------------------------------------

def test_an_unknown_kind_is_refused_and_nothing_is_written(tmp_path):
    log = EventLog(str(tmp_path / "events.jsonl"))
    with pytest.raises(EventSchemaError, match="unknown event kind 'recoverd'"):
        log.emit("recoverd", **_full(Event.RECOVERED))
    log.close()
    assert _lines(log.path) == []


def test_a_missing_required_field_is_refused_with_its_name(tmp_path):
    log = EventLog(str(tmp_path / "events.jsonl"))
    fields = _full(Event.RECOVERED)
    del fields["recovery_s"]
    with pytest.raises(EventSchemaError) as e:
        log.emit(Event.RECOVERED, **fields)
    assert isinstance(e.value, ValueError)
    assert "'recovered'" in str(e.value) and "recovery_s" in str(e.value)
    with pytest.raises(EventSchemaError, match="'job_end' lacks required field.* step"):
        log.emit("job_end", status="finished", last_step_t=None)  # a plain string kind
    log.close()
    assert _lines(log.path) == []


def test_extra_fields_and_null_values_are_allowed(tmp_path):
    log = EventLog(str(tmp_path / "events.jsonl"))
    rec = log.emit("job_end", status="finished", step=3, last_step_t=None, note="new field")
    log.emit(Event.CHECKPOINT_FAILED, step=4, reason="disk full")  # stall_s is optional
    log.close()
    (back, failed) = read_events(log.path)
    assert back == rec and back["event"] == "job_end" and back["note"] == "new field"
    assert "stall_s" not in failed


def test_a_field_may_not_shadow_the_envelope():
    with pytest.raises(EventSchemaError, match="set by the log itself"):
        validate(Event.PAUSING, {"reason": "grow", "step": 1, "t": 0.0})


# ---- the reader --------------------------------------------------------------------------------

def test_the_reader_skips_blank_torn_and_foreign_lines(tmp_path, caplog):
    path = tmp_path / "a run 'dir'" / "events.jsonl"
    log = EventLog(str(path))
    assert read_events(str(path)) == []
    first = log.emit(Event.PAUSING, reason="grow", step=1)
    log.close()
    with open(path, "ab") as f:
        f.write(b"\n   \n")
        f.write(b'[1, 2]\n{"t": "soon", "event": "pausing"}\n{"t": 1.0}\n\xff\xfe\n')
        f.write(b'{"t": 1.0, "event": "newer_kind"}\n')
        f.write(b'{"t": 1800000019.0, "event": "checkpoint_comm')  # a driver died here
    assert read_events(str(path)) == [first, {"t": 1.0, "event": "newer_kind"}]
    assert "skipped 5 line(s)" in caplog.text
    # The rerun appends after the torn line; it stays skipped, in the middle of the log now.
    log = EventLog(str(path))
    second = log.emit(Event.PAUSING, reason="preempt", step=2)
    log.close()
    events = read_events(str(path))
    assert events == [first, {"t": 1.0, "event": "newer_kind"}, second]
    assert events_of(str(path), Event.PAUSING) == [first, second]
    assert events_of(str(path), "pausing") == [first, second]
    with pytest.raises(EventSchemaError):
        events_of(str(path), "pause")


def test_get_field_refuses_what_the_schema_does_not_declare():
    rec = {"t": 1.0, "event": "recovered", **_full(Event.RECOVERED)}
    assert get_field(rec, Event.RECOVERED, "lost_steps") == 0
    assert get_field({"t": 1.0, "event": "recovered"}, Event.RECOVERED, "lost_steps", 7) == 7
    with pytest.raises(EventSchemaError, match="'recovered' declares no field 'lost_step'"):
        get_field(rec, Event.RECOVERED, "lost_step")
    with pytest.raises(EventSchemaError, match="of a 'recovered' event"):
        get_field(rec, Event.JOB_END, "step")


# ---- emit sites, run -------------------------------------------------------------------------

def test_the_committers_events_pass_the_schema(tmp_path):
    """Every event the committer writes, through the validating log: committed, wait, failed
    (with and without a stall) and skipped."""
    from coordinator.checkpoint.committer import Committer
    from coordinator.checkpoint.saver import SaveReport

    uri = str(tmp_path / "ckpt")
    path = str(tmp_path / "events.jsonl")
    c = Committer(uri, {}, 3, True, "hash0", EventLog(path))
    files = {".metadata": {"size": 3, "sha256": "0" * 64}}
    os.makedirs(os.path.join(uri, "step-00000005"))  # where the ranks' files would be
    c.on_save(SaveReport(5, 0, True, files, stall_s=0.5, waited_s=0.2, persist_s=1.0,
                         world_size=1))
    c.on_save(SaveReport(6, 0, False, stall_s=0.1, error="disk full", world_size=1))
    c.on_save(SaveReport(7, 0, True, files, generation=1, world_size=2))
    c.end_generation(1)  # rank 1 never reported step 7
    # Step 5's manifest names a file that was never written: the resolver passes over it.
    assert c.resolve_resume() is None
    kinds = [e["event"] for e in read_events(path)]
    assert kinds == ["checkpoint_wait", "checkpoint_committed", "checkpoint_failed",
                     "checkpoint_failed", "checkpoint_skipped"]
    for e in read_events(path):
        validate(e["event"], {k: v for k, v in e.items() if k not in ("t", "event")})


def test_the_auto_interval_choice_passes_the_schema():
    """The controller emits `checkpoint_interval` with step=... and **choice.fields()."""
    from coordinator.checkpoint.interval import Choice

    choice = Choice(10, 5.0, 0.1, 0.5, 400.0, "configured", 0, 12.0, 0.5, "young-daly")
    validate(Event.CHECKPOINT_INTERVAL, {"step": 10, **choice.fields()})


# ---- emit sites and readers, from the source -------------------------------------------------

def _sources(*patterns):
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
            with open(path, encoding="utf-8") as f:
                yield os.path.relpath(path, ROOT), ast.parse(f.read(), path)


def _kind_of(node):
    """The kind a literal names (`"recovered"` or `Event.RECOVERED`), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "Event"):
        return Event[node.attr].value if node.attr in Event.__members__ else f"Event.{node.attr}"
    return None


def _emit_calls():
    """(where, kind or None, explicit keywords, has a ** expansion) for every `.emit(...)` call
    in coordinator/, every file and folder (the controller may become several files)."""
    for rel, tree in _sources("coordinator/**/*.py"):
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "emit"):
                first = node.args[0] if node.args else next(
                    (k.value for k in node.keywords if k.arg == "event"), None)
                keywords = {k.arg for k in node.keywords if k.arg not in (None, "event")}
                star = any(k.arg is None for k in node.keywords)
                yield f"{rel}:{node.lineno}", _kind_of(first), keywords, star


# Emit sites that pass their fields as **a_dict cannot be checked from the source; each is
# checked when it runs, through the validating log, by the test named here.
# Forwarders pass on a kind they were given (the observers' Bus writes through the EventLog):
# every call of theirs is itself an emit site checked here.
FORWARDERS = {"coordinator/control/observers.py"}

CHECKED_WHEN_RUN = {
    "recovered": "tests/test_controller.py (every recovery the fake group plays)",
    "checkpoint_interval": "test_the_auto_interval_choice_passes_the_schema, test_controller.py",
}


def test_every_emit_site_names_a_known_kind_and_its_required_fields():
    calls = list(_emit_calls())
    problems = []
    for where, kind, keywords, star in calls:
        if kind is None and where.rsplit(":", 1)[0] in FORWARDERS:
            continue
        if kind is None:
            problems.append(f"{where}: the kind is not a literal (\"name\" or Event.NAME)")
        elif kind not in Event._value2member_map_:
            problems.append(f"{where}: unknown event kind {kind!r}")
        else:
            missing = [f for f in SCHEMA[Event(kind)].required if f not in keywords]
            if missing and not (star and kind in CHECKED_WHEN_RUN):
                problems.append(f"{where}: {kind} lacks required field(s) {', '.join(missing)}")
    assert not problems, "\n".join(problems)
    files = {where.rsplit(":", 1)[0] for where, *_ in calls}
    assert {"coordinator/runner.py", "coordinator/checkpoint/committer.py"} <= files


def test_every_kind_is_emitted_somewhere():
    """A kind no code writes any more is dead in the schema (or its emit became unreadable)."""
    emitted = {kind for _, kind, _, _ in _emit_calls()}
    assert not {k.value for k in Event} - emitted


READERS = ("coordinator/goodput/*.py", "scripts/simulate_goodput.py", "scripts/bench_recovery.py")


def test_readers_read_only_declared_kinds_and_fields():
    """The analysis names kinds as Event.X and reads fields with get_field(e, Event.X, "name"),
    both literal, so this reads every (kind, field) it uses and checks the schema declares it."""
    problems, reads = [], set()
    for rel, tree in _sources(*READERS):
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "get_field":
                kind = _kind_of(node.args[1]) if len(node.args) > 2 else None
                name = node.args[2] if len(node.args) > 2 else None
                if not (isinstance(node.args[1], ast.Attribute) and isinstance(name, ast.Constant)
                        and isinstance(name.value, str)):
                    problems.append(f"{where}: get_field needs Event.X and a literal field name")
                elif kind not in Event._value2member_map_:
                    problems.append(f"{where}: unknown kind {kind}")
                elif name.value not in SCHEMA[Event(kind)].fields:
                    problems.append(f"{where}: {kind} declares no field {name.value!r}")
                else:
                    reads.add((kind, name.value))
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "Event" and node.attr not in Event.__members__):
                problems.append(f"{where}: Event.{node.attr} is not a kind")
            elif isinstance(node, (ast.Compare, ast.Call)):
                # a kind compared or passed as a bare string (other strings may be kind-like:
                # an output key named checkpoint_interval is no event)
                operands = ([node.left, *node.comparators] if isinstance(node, ast.Compare)
                            else node.args)
                for op in operands:
                    for c in (op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]):
                        if isinstance(c, ast.Constant) and c.value in Event._value2member_map_:
                            problems.append(f"{where}: the bare string {c.value!r}: use Event.X")
    assert not problems, "\n".join(problems)
    # What the goodput spans hang on is among them (the scan did see the readers).
    assert {("group_formed", "restore_s"), ("failure_detected", "last_step_t"),
            ("recovered", "lost_steps"), ("checkpoint_committed", "stall_s")} <= reads
