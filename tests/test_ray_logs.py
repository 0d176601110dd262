"""What of Ray's forwarded output reaches the terminal (coordinator/ray_logs.py)."""

import pytest

from coordinator import ray_logs

pytestmark = pytest.mark.unit

NOTICE = ("A worker died or was killed while executing a task by an unexpected system error. "
          "To troubleshoot the problem, check the logs for the dead worker.")


def test_raylet_notices_and_gloo_errors_go_to_the_file_a_task_s_prints_stay(tmp_path):
    printed = []
    path = tmp_path / "logs" / "ray.log"
    router = ray_logs._Router(str(path), lambda data, *a, **k: printed.append((data, a, k)))
    router({"lines": [NOTICE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    router({"lines": ["[2026-12-03 16:54:02,251 E 14751 14751] (gcs_server) "
                      "gcs_actor_scheduler.cc:538: Failed to kill actor NIL_ID, return status: "
                      "Disconnected: GRPC client is shut down."], "pid": "gcs_server",
            "is_err": True}, ignore_prefix=False)
    router({"lines": ["epoch 3 done", "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                      "Read error [10.0.0.2]:4242: Connection reset by peer",
                      "terminate called: GLHF"],
            "pid": 4321, "actor_name": "TrainWorker", "ip": "10.0.0.1", "is_err": True},
           ignore_prefix=False)
    assert [(d["pid"], d["lines"]) for d, _, _ in printed] == [(4321, ["epoch 3 done"])]
    assert printed[0][2] == {"ignore_prefix": False} and printed[0][0]["is_err"]
    text = path.read_text().splitlines()
    assert len(text) == 4 and router.routed == 4
    assert "(pid=raylet) A worker died or was killed" in text[0]
    assert "(pid=gcs_server)" in text[1] and "Failed to kill actor" in text[1]
    assert "(TrainWorker pid=4321 ip=10.0.0.1)" in text[2] and "Connection reset" in text[2]


def test_lines_stay_on_the_terminal_when_the_file_cannot_be_written(tmp_path):
    printed = []
    blocker = tmp_path / "not a dir"
    blocker.write_text("")
    router = ray_logs._Router(str(blocker / "ray.log"), lambda d, *a, **k: printed.append(d))
    router({"lines": [NOTICE], "pid": "raylet", "is_err": False})
    assert printed and printed[0]["lines"] == [NOTICE]


def test_the_hook_wraps_ray_s_printer_once_and_follows_the_newest_job(tmp_path, monkeypatch):
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    monkeypatch.setattr(ray_worker, "print_to_stdstream", original)
    first = ray_logs.route_ray_logs(str(tmp_path / "a.log"))
    assert isinstance(first, ray_logs._Router) and ray_worker.print_to_stdstream is first
    assert first.terminal is original
    second = ray_logs.route_ray_logs(str(tmp_path / "b.log"))
    assert second is first and first.path == str(tmp_path / "b.log")
