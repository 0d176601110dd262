"""A real Ray head on 127.0.0.1 and a real `ray job submit` of our coordinator."""

import json
import os
import re
import secrets
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.timeout(420)


def test_ray_job_submit_runs_to_success(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    # Token authentication, as Ray >= 2.59 does by default for local clusters: our own token, so
    # the test neither reads nor writes ~/.ray/auth_token.
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    dash_port = free_port()
    subprocess.run([ray, "start", "--head", f"--port={free_port()}",
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash_port}", "--num-cpus=4", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    run_dir = tmp_path / "job run"
    try:
        proc = subprocess.run(
            [ray, "job", "submit", "--address", f"http://127.0.0.1:{dash_port}",
             "--working-dir", ".", "--", "python", "-m", "coordinator", "run",
             "configs/ray_cluster.yaml", "train.steps=30", f"run.dir='{run_dir}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
        assert summary["status"] == "finished" and summary["steps"] == 30
        assert summary["world_sizes"] == [4]
        assert "connected to Ray cluster" in out
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
