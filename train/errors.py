"""Error text short enough for a log line or an event field (used by train/ and coordinator/)."""

from __future__ import annotations

from typing import Optional


def short_error(error: object, limit: Optional[int] = 300) -> str:
    """`str(error)` on one line (every run of whitespace, newlines included, becomes one space),
    cut to `limit` characters (None: no cut). gloo and DCP errors span many lines and may carry a
    whole traceback; an event or a log line wants the opening."""
    text = " ".join(str(error).split())
    return text if limit is None else text[:limit]


def last_line(error: BaseException) -> str:
    """The last line of a multi-line error: Ray's RayTaskError text starts with a header and a
    traceback; the reason the user wants is its last line."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def first_sentence(error: BaseException) -> str:
    """The opening sentence: Ray's actor-death text runs to a paragraph of advice."""
    text = short_error(error, limit=None)
    return text.split(". ")[0].rstrip(".") if text else type(error).__name__
