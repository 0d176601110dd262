"""A real Ray head on 127.0.0.1 and a real `ray job submit` of our coordinator."""

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def _scrape(port, found, stop):
    """Poll the head's Prometheus endpoint (what a scrape of the cluster reads) and keep our
    series: Ray exports the job's metrics there while it runs."""
    while not stop.is_set():
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            for line in body.decode().splitlines():
                if line.startswith("ray_elastic_") and 'job="ray_cluster"' in line:
                    found[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
        except OSError:
            pass
        stop.wait(1.0)


def test_ray_job_submit_runs_to_success(tmp_path):
    """The job through Ray's job server, and its metrics in the cluster's Prometheus endpoint."""
    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    # Token authentication, as Ray >= 2.59 does by default for local clusters: our own token, so
    # the test neither reads nor writes ~/.ray/auth_token.
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    dash_port, metrics_port = free_port(), free_port()
    subprocess.run([ray, "start", "--head", f"--port={free_port()}",
                    f"--metrics-export-port={metrics_port}",
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash_port}", "--num-cpus=4", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    run_dir = tmp_path / "job run"
    found, stop = {}, threading.Event()
    scraper = threading.Thread(target=_scrape, args=(metrics_port, found, stop), daemon=True)
    scraper.start()
    steps = 1500  # long enough (~20 s) for Ray's metrics export interval to report it running
    try:
        proc = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash_port}",
             "--working-dir", ".", "--", "python", "-m", "coordinator", "run",
             "configs/ray_cluster.yaml", f"train.steps={steps}", "run.log_interval_s=1",
             f"run.dir='{run_dir}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        time.sleep(1)
        stop.set()
        scraper.join(timeout=10)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out)
        assert job_id, out
        # The job server's own record of the job, through Ray's job SDK (in a fresh process: Ray
        # reads the auth settings once, at import).
        query = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
                 "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
        status = subprocess.run([sys.executable, "-c", query, f"http://127.0.0.1:{dash_port}",
                                 job_id.group(1)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr
        with open(run_dir / "summary.json") as f:
            summary = json.load(f)
        assert summary["status"] == "finished" and summary["steps"] == steps
        assert summary["world_sizes"] == [4]
        assert "connected to Ray cluster" in out
        assert 0 < found.get("ray_elastic_step", 0) <= steps, found
        assert found.get("ray_elastic_world_size") == 4 and found.get("ray_elastic_steps_per_s", 0) > 0
        assert 0 < found.get("ray_elastic_goodput", 0) < 1, found
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
