"""The run directory's event log (`events.jsonl`, appended across reruns) and `summary.json`."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Dict, Iterator, List

logger = logging.getLogger(__name__)


class EventLog:
    """Appends one JSON object per line, each with `t` (unix seconds) and `event`. Every line is
    flushed and fsynced so that a crash of the driver loses no event it already emitted."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")
        # A driver killed in the middle of a line left it without its newline: end it, so the
        # first event of this run is a line of its own, not glued to the torn one.
        if self._f.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")
                    self._f.flush()

    def emit(self, event: str, **fields: Any) -> Dict[str, Any]:
        record = {"t": time.time(), "event": event, **fields}
        line = json.dumps(record, default=str)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        return record

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_events(path: str) -> Iterator[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def events_of(path: str, name: str) -> List[Dict[str, Any]]:
    return [e for e in read_events(path) if e["event"] == name]
