"""Shared fixtures: the real Omniglot small sets and a small synthetic store."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "omniglot"
SMALL1 = SHARED / "images_background_small1.zip"
SMALL2 = SHARED / "images_background_small2.zip"


def pytest_configure(config):
    # Tests must not depend on the user's tracking server or Ray auth settings.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # `ray start --head` with token auth aborts without a token, where `ray.init()` would
    # have made one under ~/.ray: give a fresh machine one for this session.
    token_known = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token_known and not (Path.home() / ".ray" / "auth_token").is_file():
        token = Path(tempfile.mkdtemp(prefix="fewshot-ray-")) / "auth_token"
        token.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    # Runtime probes (fewshot.runtime) cached for this session only, not in the user's home.
    os.environ["FEWSHOT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fewshot-cache-")


@pytest.fixture(scope="session")
def omniglot_zips() -> tuple[Path, Path]:
    if not SMALL1.is_file():
        pytest.fail(f"{SMALL1} is missing: tests need ../shared/datasets/omniglot beside the repo")
    return SMALL1, SMALL2


@pytest.fixture(scope="session")
def omniglot_store(tmp_path_factory, omniglot_zips) -> Path:
    """Omniglot small1 and small2 as one store with splits `small1` and `small2`."""
    from fewshot.data.sources import omniglot

    out = tmp_path_factory.mktemp("stores") / "omniglot"
    omniglot.prepare(list(omniglot_zips), out)
    return out


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """A small synthetic store: 6 train, 2 val, 2 test scripts of 6 characters."""
    from fewshot.data.sources import synthetic

    out = tmp_path_factory.mktemp("stores") / "synthetic"
    synthetic.prepare(out, groups=(6, 2, 2), classes_per_group=6, images_per_class=10)
    return out


@pytest.fixture(scope="session")
def tiny_config(synthetic_store):
    """`tiny_config(*overrides)`: a config on the synthetic store small enough for a unit
    test to train a few steps in a second (16 px, width-8 backbone, 3 queries, 2 tasks)."""
    from fewshot.config import load_config

    def make(*overrides: str):
        base = [
            f"data.path={synthetic_store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            "episode.meta_batch=2",
        ]
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a fresh directory, so runs/ and mlflow.db land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks(monkeypatch):
    """`mlflow.set_tracking_uri` in a test also sets $MLFLOW_TRACKING_URI; undo it after
    each test so the next one gets the default store of its own directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`train.threads` sets a process-wide torch setting; give each test the default back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextmanager
def local_cluster(nodes: list, head_cpus: float, **env: str):
    """A LocalCluster joined by this process as its driver, with $RAY_ADDRESS pointing at
    it for the CLIs that tests start; stops exactly the processes it started."""
    from fewshot.ray_cluster import LocalCluster

    fast = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **env}
    # Job entrypoints run `python` from the nodes' PATH: this environment's.
    path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cluster = LocalCluster(nodes, head_cpus=head_cpus, env={**fast, **path}).start()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", *fast)}
    os.environ.update(RAY_ADDRESS=cluster.address, **fast)
    try:
        yield cluster
    finally:
        cluster.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


class JoinedCluster:
    """A running multi-machine cluster that the tests join instead of starting one
    ($FEWSHOT_TEST_CLUSTER, see docs/distributed.md, "Testing on a real cluster"): its worker
    nodes carry the custom resources `node_a` and `node_b`. Tests that take a node
    or a worker down by PID skip here (`local` is False): those processes are on other
    machines."""

    def __init__(self, address: str, dashboard: str) -> None:
        import ray

        from fewshot.ray_cluster import NodeSpec

        self.address, self.dashboard, self.local = address, dashboard, False
        self.nodes = [NodeSpec("node_a"), NodeSpec("node_b")]
        ray.init(address=address)

    def node_id(self, name: str) -> str:
        import ray

        (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and name in n["Resources"]]
        return node


@pytest.fixture(scope="module")
def cluster():
    """Three real Ray nodes on 127.0.0.1: a head that runs no training (0 CPUs; it holds
    the driver, the Jobs server and Train's controller) and two worker nodes `node_a`
    and `node_b` of 1 CPU and a 200 MiB object store each. With $FEWSHOT_TEST_CLUSTER
    (a Ray address) and $FEWSHOT_TEST_DASHBOARD, a real cluster instead."""
    from fewshot.ray_cluster import NodeSpec

    if os.environ.get("FEWSHOT_TEST_CLUSTER"):
        import ray

        joined = JoinedCluster(
            os.environ["FEWSHOT_TEST_CLUSTER"], os.environ["FEWSHOT_TEST_DASHBOARD"]
        )
        yield joined
        ray.shutdown()
        return

    # A killed node is declared dead after 3 missed health checks 1 s apart (Ray's
    # default is 5 missed, 3 s apart), and Train gives up starting a worker group that
    # cannot be placed after 20 s instead of 60.
    quick = {
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
    }
    nodes = [NodeSpec("node_a"), NodeSpec("node_b")]
    with local_cluster(nodes, head_cpus=0, **quick) as cluster:
        yield cluster
