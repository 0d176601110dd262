import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/local_cpu.yaml (what `make run` runs) injects faults on purpose; tests that use it for
# something else switch them off with this override.
NO_CHAOS = "chaos.events=[]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_events(run_dir):
    """The events of a run directory (empty before the run wrote any)."""
    from coordinator.events import read_events

    path = os.path.join(run_dir, "events.jsonl")
    return list(read_events(path)) if os.path.exists(path) else []


def run_events_of(run_dir, kind):
    """The events of one kind (`event` field) of a run directory."""
    return [e for e in run_events(run_dir) if e["event"] == kind]


def run_summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def run_cli(args, cwd=ROOT, timeout=240, env=None):
    """Run `python -m coordinator ...` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.pop("RAY_ADDRESS", None)  # embedded Ray unless the test names a cluster
    full_env.update(env or {})
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def root():
    return ROOT


TIERS = ("unit", "e2e", "s3", "slurm")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier (pyproject.toml's markers), so `make test-fast`
    (-m unit) never silently drops a new test file."""
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t) is not None]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: mark it with exactly one tier of {TIERS} "
                                    f"(found {tiers or 'none'})")


@contextlib.contextmanager
def cli_process(args, cwd=ROOT, pythonpath=()):
    """`python -m coordinator ...` started in the background (output in `.stdout`, merged), for
    tests that act on the job while it runs; killed on the way out if it is still running."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # embedded Ray unless the test names a cluster
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *map(str, pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "coordinator", *args], cwd=str(cwd), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _as_root(cmd):
    """`cmd` with root rights: as is when the tests run as root (as .ci/run does in its
    container), through `sudo -n` when that works; None when neither does."""
    if os.geteuid() == 0:
        return cmd
    if subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", *cmd]
    return None


@contextlib.contextmanager
def tmpfs(path, size):
    """A real tmpfs of `size` (mount's syntax: "4m") at `path`, unmounted on the way out (lazily
    if a process still holds a file there). Skips the test where nothing may mount."""
    os.makedirs(path, exist_ok=True)
    cmd = _as_root(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)])
    done = subprocess.run(cmd, capture_output=True, text=True) if cmd else None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or passwordless sudo): "
                    f"{done.stderr.strip() if done else 'not root'}")
    try:
        yield path
    finally:
        remount(path, "rw", check=False)
        if subprocess.run(_as_root(["umount", str(path)]), capture_output=True).returncode:
            subprocess.run(_as_root(["umount", "-l", str(path)]), capture_output=True)


def remount(path, mode, check=True):
    """Remount a tmpfs made by `tmpfs` read-only ("ro") or writable again ("rw")."""
    subprocess.run(_as_root(["mount", "-o", f"remount,{mode}", str(path)]), check=check,
                   capture_output=True)


@pytest.fixture(scope="module")
def world1():
    """A gloo process group of one rank (this process), for a module's tests; the group for
    checkpoints on it."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    group = dist.new_group(backend="gloo")
    yield group
    dist.destroy_process_group()
