"""Joining Ray: one rule for training, searches and serving; and a real multi-node
cluster on one machine (`LocalCluster`) for tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import fewshot
from fewshot.errors import FewShotError


def connect(address: str | None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start Ray on this machine,
    with its dashboard on 127.0.0.1 if `dashboard`: Ray Tune over Ray Train needs it
    (the State API behind it is how Train removes the placement group of a run whose
    driver was stopped, as a trial stopped by the scheduler is; without it the run's
    CPUs stay reserved and later trials wait forever)."""
    import ray  # start-up time: most commands never touch Ray

    if ray.is_initialized():
        return
    # Workers and replicas import exactly the driver's code (a submitted job's copy, not
    # whatever version a node has installed).
    code = {"py_modules": [str(Path(fewshot.__file__).parent)]}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=code)
    elif dashboard:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=code)
    else:
        ray.init(include_dashboard=False, runtime_env=code)


@dataclass(frozen=True)
class NodeSpec:
    """One worker node of a `LocalCluster`: its CPUs, its object store and a custom
    resource named `name` (1 unit), so work can be pinned to it by name."""

    name: str
    cpus: float = 1
    object_store_mb: int = 200


@dataclass
class LocalCluster:
    """A real multi-node Ray cluster on this machine, started as a user starts one:
    `ray start --head` and one `ray start --address` per worker node, each with its own
    raylet and object store; objects move between nodes through Ray's object manager.

    Every node runs `ray start --block` as a child of this process, so a node is its
    process tree: `kill(name)` takes one node down hard (raylet, agents and workers, by
    PID), and `stop()` stops exactly what this object started, never another Ray on the
    machine (`ray stop` would). Token auth comes from the environment, as on a cluster.
    """

    nodes: list[NodeSpec]
    head_cpus: float = 0
    head_object_store_mb: int = 200
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    dashboard: str = ""
    local = True  # its nodes are processes of this machine
    _processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, timeout: float = 120) -> LocalCluster:
        port, dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self._spawn(
            "head",
            "--head",
            f"--port={port}",
            f"--num-cpus={self.head_cpus:g}",
            f"--object-store-memory={self.head_object_store_mb * 2**20}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
        )
        deadline = time.monotonic() + timeout
        while not self._connected():
            self._check_alive("head", deadline)
            time.sleep(0.5)
        for node in self.nodes:
            self.start_node(node.name, timeout)
        return self

    def start_node(self, name: str, timeout: float = 120) -> None:
        """Start worker node `name` (again, after `kill`), and wait until it has joined.
        One at a time: nodes that start together race for the same socket names."""
        import ray

        (node,) = [n for n in self.nodes if n.name == name]
        self._spawn(
            name,
            f"--address={self.address}",
            f"--num-cpus={node.cpus:g}",
            f"--object-store-memory={node.object_store_mb * 2**20}",
            f"--resources={json.dumps({name: 1})}",
        )
        deadline = time.monotonic() + timeout
        # Joined, and its resources offered: an elastic run sizes itself by what it sees.
        while ray.available_resources().get(name, 0) < 1:
            self._check_alive(name, deadline)
            time.sleep(0.2)

    def _spawn(self, name: str, *args: str) -> None:
        ray_cli = str(Path(sys.executable).parent / "ray")
        common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        # Each node's dashboard agent needs its own port (the default is one fixed port).
        common.append(f"--dashboard-agent-listen-port={free_port()}")
        self._processes[name] = subprocess.Popen(
            [ray_cli, "start", *args, *common],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _connected(self) -> bool:
        import ray

        try:
            ray.init(address=self.address, logging_level="ERROR")
        except Exception:  # noqa: BLE001  (while the GCS starts Ray raises several kinds)
            return False
        return True

    def _check_alive(self, name: str, deadline: float) -> None:
        code = self._processes[name].poll()
        if code is not None or time.monotonic() > deadline:
            self.stop()
            why = f"exited with {code}" if code is not None else "did not join in time"
            raise FewShotError(f"local Ray node {name!r} {why}; see /tmp/ray/session_latest/logs")

    def node_id(self, name: str) -> str:
        """The Ray node id of the node started as `name` (its custom resource)."""
        import ray

        for node in ray.nodes():
            if node["Alive"] and name in node["Resources"]:
                return node["NodeID"]
        raise KeyError(name)

    def running(self) -> list[str]:
        """The worker nodes started and not killed."""
        return [name for name in self._processes if name != "head"]

    def pids(self, name: str) -> list[int]:
        """The node's processes: `ray start` and everything under it."""
        return [process.pid for process in tree(self._processes[name])]

    def kill(self, name: str) -> None:
        """Take node `name` down at once, as a machine that loses power."""
        started = self._processes.pop(name)
        processes = tree(started)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=10)
        started.wait(timeout=10)

    def stop(self) -> None:
        """Stop what this cluster started: worker nodes, then the head."""
        import ray

        ray.shutdown()
        for name in [*(n.name for n in self.nodes), "head"]:
            started = self._processes.pop(name, None)
            if started is None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                processes = tree(started)
                started.terminate()  # `ray start --block` stops its node's processes
                _, alive = psutil.wait_procs(processes, timeout=15)
                for process in alive:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            started.wait(timeout=10)
        self._forget_address()

    def _forget_address(self) -> None:
        """`ray start --head` records its address for a later `ray.init()` to join, as
        `ray stop` forgets it; forget it too, or the next local `ray.init()` would try to
        join this stopped cluster."""
        from ray._common.utils import get_ray_address_file

        recorded = Path(get_ray_address_file(None))
        port = self.address.rsplit(":", 1)[-1]
        if recorded.is_file() and recorded.read_text().strip().endswith(f":{port}"):
            recorded.unlink(missing_ok=True)


def tree(started: subprocess.Popen) -> list[psutil.Process]:
    """A started node: its `ray start` process and everything under it."""
    root = psutil.Process(started.pid)
    return [root, *root.children(recursive=True)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def store_bytes(node_id: str) -> int:
    """Bytes in node `node_id`'s object store now, from its raylet's own statistics."""
    import ray
    from ray._private.internal_api import node_stats

    (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
    reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], False)
    return reply.store_stats.object_store_bytes_used
