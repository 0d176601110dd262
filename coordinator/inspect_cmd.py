"""`python -m coordinator inspect URI [--verify]`: list the checkpoints under URI."""

from __future__ import annotations

import sys
from typing import Dict, List, TextIO

from coordinator.checkpoint.manifest import CheckpointInfo, list_checkpoints
from coordinator.checkpoint.storage import filesystem


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_table(infos: List[CheckpointInfo]) -> str:
    rows = [("step", "status", "world", "size", "files", "note")]
    for ci in infos:
        rows.append((str(ci.step), ci.status, str(ci.world_size or "-"), _size(ci.bytes),
                     str(len(ci.files)), ci.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5]).rstrip()
                     for r in rows)


def run_inspect(uri: str, verify: bool, storage_options: Dict, out: TextIO = sys.stdout) -> int:
    """Exit 0 when every committed checkpoint checks out, 1 when one fails, 2 for a bad URI."""
    try:
        fs, root = filesystem(uri, storage_options)
        exists = fs.exists(root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not exists:
        print(f"error: {uri!r} does not exist", file=sys.stderr)
        return 2
    infos = list_checkpoints(uri, storage_options, verify=verify)
    if not infos:
        print(f"no checkpoints under {uri}", file=out)
        return 0
    print(format_table(infos), file=out)
    bad = [ci for ci in infos if ci.status == "corrupt"]
    committed = [ci for ci in infos if ci.status == "committed"]
    check = "checksums verified" if verify else "sizes checked; --verify rechecks every checksum"
    print(f"{len(committed)} committed, {len(bad)} corrupt, "
          f"{len(infos) - len(committed) - len(bad)} incomplete ({check})", file=out)
    return 1 if bad else 0
