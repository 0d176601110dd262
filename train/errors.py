"""Error text short enough for a log line or an event field (used by train/ and coordinator/)."""

from __future__ import annotations

from typing import Optional


def short_error(error: object, limit: Optional[int] = 300) -> str:
    """`str(error)` on one line (every run of whitespace, newlines included, becomes one space),
    cut to `limit` characters (None: no cut). gloo and DCP errors span many lines and may carry a
    whole traceback; an event or a log line wants the opening."""
    text = " ".join(str(error).split())
    return text if limit is None else text[:limit]
