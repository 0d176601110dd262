"""The commit protocol. A checkpoint is `<uri>/step-<8 digits>/` holding DCP files and, written
last, `manifest.json`: every file with its size and checksum (the algorithm is named in the
manifest's `hash`: crc32c by default, sha256 in manifests written before `checkpoint.hash`), the
step, world size, generation and config hash. No valid manifest, no checkpoint. A torn manifest is not valid JSON, so it can never
commit anything; object stores need no rename for this (S3 has none that is atomic).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from coordinator.checkpoint.storage import (
    basename,
    filesystem,
    join,
    file_checksum,
    hash_file,
    list_files,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointInfo:
    step: int
    path: str
    status: str  # committed | incomplete | corrupt
    reason: str = ""
    manifest: Optional[Dict[str, Any]] = None
    bytes: int = 0
    files: Dict[str, int] = field(default_factory=dict)  # what is in the directory: name -> size

    @property
    def world_size(self) -> Optional[int]:
        return self.manifest.get("world_size") if self.manifest else None


def write_manifest(uri: str, storage_options: Dict[str, Any], step: int,
                   files: Dict[str, Dict[str, Any]], world_size: int, generation: int,
                   config_hash: str,
                   before_write: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Commit step `step`: call only once every rank reported its files durable. `before_write`:
    a fault point called first (chaos only: `StorageOutage.check` raises OSError during an
    outage; see checkpoint.faults)."""
    if before_write is not None:
        before_write()
    fs, root = filesystem(uri, storage_options)
    manifest = {
        "format": FORMAT, "step": step, "world_size": world_size, "generation": generation,
        "config_hash": config_hash, "created": time.time(),
        "bytes": sum(int(f["size"]) for f in files.values()),
        "files": {name: _file_entry(f) for name, f in sorted(files.items())},
    }
    algorithms = {file_checksum(f)[0] for f in files.values()}
    if len(algorithms) == 1:
        manifest["hash"] = algorithms.pop()
    with fs.open(join(root, step_name(step), MANIFEST), "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _file_entry(record: Dict[str, Any]) -> Dict[str, Any]:
    algorithm, digest = file_checksum(record)
    return {"size": int(record["size"]), algorithm: digest}


def _parse_manifest(raw: bytes, step: int) -> Tuple[Optional[Dict[str, Any]], str]:
    try:
        m = json.loads(raw)
    except ValueError:
        return None, "manifest.json is not valid JSON (torn write?)"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, f"manifest.json has an unknown format {m.get('format') if isinstance(m, dict) else m!r}"
    if m.get("step") != step:
        return None, f"manifest.json says step {m.get('step')}, directory says {step}"
    files = m.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        return None, "manifest.json lists no DCP .metadata"
    for name, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
            return None, f"manifest.json gives no size for {name}"
        try:
            file_checksum(meta)
        except ValueError as e:
            return None, f"manifest.json gives {name} {e}"
    return m, ""


def inspect_step(fs, root: str, uri: str, step: int, verify: bool) -> CheckpointInfo:
    """Status of one step directory. `root` is `uri` as the filesystem names it (no scheme);
    the returned path is a full URI that any process can open."""
    path = join(root, step_name(step))
    present = list_files(fs, path)
    ci = CheckpointInfo(step, join(uri, step_name(step)), "incomplete", files=present,
                        bytes=sum(v for k, v in present.items() if k != MANIFEST))
    if MANIFEST not in present:
        ci.reason = "no manifest.json (never committed, or still being written)"
        return ci
    with fs.open(join(path, MANIFEST), "rb") as f:
        manifest, why = _parse_manifest(f.read(), step)
    if manifest is None:
        ci.status, ci.reason = "corrupt", why
        return ci
    ci.manifest = manifest
    for name, meta in manifest["files"].items():
        if name not in present:
            ci.status, ci.reason = "corrupt", f"{name} is missing"
            return ci
        if present[name] != meta["size"]:
            ci.status, ci.reason = "corrupt", (f"{name} has {present[name]} bytes, "
                                               f"manifest says {meta['size']}")
            return ci
    if verify:
        for name, meta in manifest["files"].items():
            algorithm, digest = file_checksum(meta)
            if hash_file(fs, join(path, name), algorithm) != digest:
                ci.status, ci.reason = "corrupt", f"{name} fails its {algorithm} check"
                return ci
    ci.status = "committed"
    ci.bytes = manifest["bytes"]
    return ci


def list_steps(uri: str, storage_options: Dict[str, Any]) -> List[int]:
    fs, root = filesystem(uri, storage_options)
    if not fs.exists(root):
        return []
    steps = []
    for info in fs.ls(root, detail=True):
        m = _STEP_DIR.match(basename(info["name"]))
        if m and info.get("type") == "directory":
            steps.append(int(m.group(1)))
    return sorted(steps)


def list_checkpoints(uri: str, storage_options: Dict[str, Any],
                     verify: bool = False) -> List[CheckpointInfo]:
    fs, root = filesystem(uri, storage_options)
    return [inspect_step(fs, root, uri, s, verify) for s in list_steps(uri, storage_options)]


def resolve_latest(uri: str, storage_options: Dict[str, Any], verify: bool,
                   unusable: Optional[Dict[int, str]] = None,
                   ) -> Tuple[Optional[CheckpointInfo], List[CheckpointInfo]]:
    """The newest checkpoint that is committed (and, with `verify`, whose checksums match), and
    the newer ones passed over (with why). `unusable`: steps to pass over whatever their status
    (step -> why: they failed to restore), reported with the status "unusable"."""
    fs, root = filesystem(uri, storage_options)
    unusable = unusable or {}
    skipped = []
    for step in reversed(list_steps(uri, storage_options)):
        if step in unusable:
            skipped.append(CheckpointInfo(step, join(uri, step_name(step)), "unusable",
                                          unusable[step]))
            continue
        ci = inspect_step(fs, root, uri, step, verify)
        if ci.status == "committed":
            return ci, skipped
        skipped.append(ci)
    return None, skipped


def delete_checkpoint(uri: str, storage_options: Dict[str, Any], step: int) -> None:
    """Uncommit first (the manifest goes before any shard), then remove the rest."""
    fs, root = filesystem(uri, storage_options)
    path = join(root, step_name(step))
    manifest = join(path, MANIFEST)
    if fs.exists(manifest):
        fs.rm(manifest)
    fs.rm(path, recursive=True)


def retention_victims(infos: List[CheckpointInfo], keep: int, protected: set) -> List[int]:
    """Steps to delete: committed ones beyond the newest `keep`, and uncommitted leftovers older
    than the newest committed. Never the newest committed one nor a protected (in-use) step."""
    committed = [c.step for c in infos if c.status == "committed"]
    if not committed:
        return []
    newest = max(committed)
    keep_set = set(sorted(committed)[-keep:]) | {newest} | set(protected)
    victims = [s for s in committed if s not in keep_set]
    victims += [c.step for c in infos if c.status != "committed" and c.step < newest
                and c.step not in protected]
    return sorted(victims)
