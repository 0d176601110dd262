"""Where the job runs: an existing Ray cluster, or an embedded one started here.

Reads `RAY_ADDRESS` (set by `ray job submit` and our SLURM script) in this one place. With neither
`RAY_ADDRESS` nor `ray.address`, starts Ray in-process; with `ray.simulated_nodes: N`, starts N
simulated nodes on this machine (`ray.cluster_utils.Cluster`: each its own raylet and node id, so a
node can be removed and added like a real one). The head of a simulated cluster holds no CPUs, so
every worker lives on a removable node.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
from typing import Dict, Iterable, List, Optional

import ray

from coordinator.config import Config
from coordinator.ray_logs import route_ray_logs

logger = logging.getLogger(__name__)


def ray_address(cfg: Config) -> Optional[str]:
    """The cluster to join: RAY_ADDRESS (as set by `ray job submit` and SLURM scripts) wins over
    `ray.address`; None means start an embedded Ray."""
    return os.environ.get("RAY_ADDRESS") or cfg.ray.address


def probe_address(address: str, timeout_s: float = 5.0) -> Optional[str]:
    """For a `host:port` (or `ray://host:port`) address, try a TCP connection: ray.init would
    otherwise retry for minutes. Returns why it is unreachable, or None. `auto` and other forms are
    left to ray.init, which fails fast for them."""
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or e})"


class Cluster:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.address = ray_address(cfg)
        self.embedded = self.address is None
        self._sim = None  # ray.cluster_utils.Cluster when simulating nodes
        self.sim_nodes: List = []
        self._frozen: Dict[str, List[int]] = {}  # node id -> pids stopped by freeze_node_of

    def cpus_per_node(self) -> float:
        """Logical CPUs per simulated node: as configured, or enough for max_workers spread over
        the nodes. Logical CPUs may exceed physical cores: Ray only counts slots."""
        if self.cfg.ray.cpus_per_node is not None:
            return self.cfg.ray.cpus_per_node
        workers = self.cfg.scaling.max_workers + self.cfg.scaling.spare_workers
        need = workers * self.cfg.scaling.cpus_per_worker
        return float(math.ceil(need / max(1, self.cfg.ray.simulated_nodes)))

    def connect(self) -> None:
        # The raylets' notices and gloo's raw errors go to a file, not the terminal.
        route_ray_logs(os.path.join(self.cfg.run.dir, "logs", "ray.log"))
        self._connect()

    def _connect(self) -> None:
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
        # Ray's own start-up notices ("Overwriting previous Ray address", token authentication)
        # are not for the terminal: ray.init applies logging_level only once it runs.
        logging.getLogger("ray").setLevel(logging.ERROR)
        if not self.embedded:
            if self.cfg.ray.simulated_nodes:
                logger.warning("ray.simulated_nodes=%d ignored: connecting to %s",
                               self.cfg.ray.simulated_nodes, self.address)
            ray.init(address=self.address, **quiet)
            logger.info("connected to Ray cluster at %s", self.address)
            return
        # Workers import the user's task module: let them see the driver's directory too.
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": path}}
        if self.cfg.ray.simulated_nodes:
            from ray.cluster_utils import Cluster as SimCluster

            self._sim = SimCluster(initialize_head=True,
                                   head_node_args={"num_cpus": 0, "include_dashboard": False})
            for _ in range(self.cfg.ray.simulated_nodes):
                self.add_node()
            ray.init(address=self._sim.address, runtime_env=runtime_env, **quiet)
            self._sim.wait_for_nodes()
            logger.info("embedded Ray: %d simulated nodes of %g CPUs",
                        self.cfg.ray.simulated_nodes, self.cpus_per_node())
        else:
            workers = self.cfg.scaling.max_workers + self.cfg.scaling.spare_workers
            cpus = max(os.cpu_count() or 1, math.ceil(workers * self.cfg.scaling.cpus_per_worker))
            # address="local": always a new instance. Without it ray.init joins the cluster named
            # in /tmp/ray/ray_current_cluster, which a Ray killed without `ray stop` (a SLURM
            # step, say) leaves behind, and then refuses num_cpus.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     runtime_env=runtime_env, **quiet)
            logger.info("embedded Ray: one local node of %d CPUs", cpus)

    def add_node(self):
        """Add a simulated node (embedded simulation only)."""
        assert self._sim is not None, "add_node needs ray.simulated_nodes > 0"
        node = self._sim.add_node(num_cpus=self.cpus_per_node())
        self.sim_nodes.append(node)
        return node

    def add_node_if_simulated(self) -> None:
        """The add_node chaos action: a new simulated node, or a warning on a real cluster."""
        if self._sim is None:
            logger.warning("chaos add_node ignored: not a simulated cluster (ray.simulated_nodes)")
            return
        node = self.add_node()
        logger.info("simulated node %s added (%g CPUs)", node.node_id[:8], self.cpus_per_node())

    def driver_ip(self) -> str:
        return "127.0.0.1" if self.embedded else ray.util.get_node_ip_address()

    def free_slots(self, exclude: Iterable[str] = ()) -> Dict[str, int]:
        """{node_id: how many more workers fit on it now}, alive nodes not in `exclude` only."""
        excluded = set(exclude)
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        try:
            from ray._private.state import state  # per-node availability, as the autoscaler reads it

            per_node = state.available_resources_per_node()
        except Exception as e:  # a Ray without it: count the cluster as one pool
            logger.debug("per-node resources unavailable (%s): using cluster totals", e)
            per_node = {"": ray.available_resources()}
        slots = {}
        for node_id, free in per_node.items():
            if node_id in excluded or (node_id and node_id not in alive):
                continue
            n = int(free.get("CPU", 0) // self.cfg.scaling.cpus_per_worker + 1e-9)
            if self.cfg.scaling.use_gpu:
                n = min(n, int(free.get("GPU", 0)))
            if n > 0:
                slots[node_id] = n
        return slots

    def capacity(self, exclude: Iterable[str] = ()) -> int:
        """How many workers the free resources can hold right now (nodes in `exclude` aside)."""
        return sum(self.free_slots(exclude).values())

    # ---- simulated nodes (chaos) -------------------------------------------------------------
    def remove_node_of(self, node_id: str) -> bool:
        """Remove the simulated node with this Ray node id, as if the machine died. Returns False
        when it is not a simulated node of this process (a real cluster's nodes are not ours)."""
        for node in list(self.sim_nodes):
            if node.node_id == node_id:
                self.sim_nodes.remove(node)
                # Graceful: the raylet stops its workers (SIGKILLed mid-step as far as training
                # is concerned) and tells the GCS at once, as a drained or reclaimed machine does;
                # an abrupt kill would also make Ray print the raylet's log to our terminal.
                self._sim.remove_node(node, allow_graceful=True)
                return True
        return False

    def freeze_node_of(self, node_id: str, seconds: float) -> bool:
        """Freeze the simulated node with this Ray node id for `seconds`: SIGSTOP its raylet and
        every process under it (its workers among them), as a kernel stall or a network cut
        looks from outside: nothing answers, nothing dies. Then SIGCONT them. Returns False when
        it is not a simulated node of this process."""
        node = next((n for n in self.sim_nodes if n.node_id == node_id), None)
        if node is None:
            return False
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos
                 if info.process is not None]
        pids = _with_descendants(roots)
        _signal_all(pids, signal.SIGSTOP)
        self._frozen[node_id] = pids
        timer = threading.Timer(seconds, self._thaw, args=(node_id,))
        timer.daemon = True
        timer.start()
        logger.info("simulated node %s frozen for %gs (%d processes stopped)", node_id[:8],
                    seconds, len(pids))
        return True

    def _thaw(self, node_id: str) -> None:
        pids = self._frozen.pop(node_id, None)
        if pids:
            _signal_all(pids, signal.SIGCONT)
            logger.info("simulated node %s thawed", node_id[:8])

    def shutdown(self) -> None:
        for node_id in list(self._frozen):  # never leave a stopped process behind
            self._thaw(node_id)
        ray.shutdown()
        if self._sim is not None:
            self._sim.shutdown()
            self._sim = None


def _with_descendants(roots: List[int]) -> List[int]:
    """`roots` and every process below them (from /proc: Linux)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry))
    seen, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children.get(pid, []))
    return seen


def _signal_all(pids: List[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
