"""Ray Train for real on a 3-node cluster of `ray start` processes on 127.0.0.1 (the
`cluster` fixture): placement, data once per node, workers and nodes killed by PID,
elastic resume, storage every node sees, jobs submitted with Ray's own CLI."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from fewshot import model_file
from fewshot.config import load_config
from fewshot.data.episodes import EpisodeSampler
from fewshot.errors import ConfigError, FewShotError
from fewshot.ray_cluster import store_bytes
from fewshot.streams import Stream
from fewshot.train.datasets import Datasets
from fewshot.train.distributed import (
    check_resources,
    check_storage,
    fit_on_ray,
    share_datasets,
    shared_datasets,
)
from fewshot.train.loop import Worker, fit

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]


def shared(out: Path) -> Path:
    """Checkpoint storage that every node sees: on one machine, any local directory; on
    a real cluster, a directory under the shared mount $FEWSHOT_TEST_STORAGE."""
    root = os.environ.get("FEWSHOT_TEST_STORAGE")
    return Path(root) / out.name if root else out / "ray"


def settings(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.path={store}",
        "data.image_size=28",
        "backbone.width=16",
        "episode.q_query=5",
        "episode.meta_batch=4",
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.lr=0.05",
        "train.schedule=constant",
        "train.val_episodes=8",
        "evaluate.episodes=40",
        f"train.output_dir={out}",
        # On one machine every node sees tmp_path: the shared storage a cluster needs.
        f"distributed.storage_path={shared(out)}",
        "distributed.workers=2",
        *extra,
    ]


def parameters(state: dict) -> dict:
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_two_workers_take_exactly_the_steps_of_one(cluster, synthetic_store, tmp_path, method):
    """2 workers on 2 nodes with B/2 tasks each == 1 worker with B tasks (SGD: same
    gradients), the gradients summed across nodes."""
    extra = ["method.name=maml", "method.inner_steps=1"] if method == "maml" else []
    # One thread everywhere: a different thread count changes float summation order.
    config = load_config(
        None,
        settings(
            synthetic_store,
            tmp_path,
            "train.steps=3",
            "train.eval_every=3",
            "tracking.enabled=false",
            "train.threads=1",
            "distributed.placement=spread",
            f"name=eq-{method}",
            *extra,
        ),
    )
    model, metrics = fit_on_ray(config, run_id=None)
    assert sorted(metrics["placement"]) == sorted(node_ids(cluster))  # one rank per node
    single = Worker(config)  # the same loop, one process, all B tasks
    initial = parameters({k: v.clone() for k, v in single.method.state_dict().items()})
    for _ in range(3):
        single.train_step()
    expected = parameters(single.method.state_dict())
    got = parameters(model["state_dict"])
    assert got.keys() == expected.keys()
    moved = max((expected[n] - initial[n]).abs().max().item() for n in expected)
    assert moved > 1e-2  # training really changed the weights
    for name in expected:
        # Equal up to the order of one float sum (gloo's over two ranks).
        difference = (got[name] - expected[name]).abs().max().item()
        assert difference <= 1e-5 * moved, (name, difference, moved)


def node_ids(cluster) -> list[str]:
    return [cluster.node_id(node.name) for node in cluster.nodes]


def first_checkpoint(storage: Path, timeout: float = 240) -> None:
    """Wait until Ray Train has registered a checkpoint, not merely begun writing one.

    A `checkpoint_*` folder appears before the controller records it in its snapshot;
    a run stopped in between starts again from step 0 (Ray restores only from the snapshot).
    """
    snapshot = storage / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while not registered_checkpoint(snapshot):
        assert time.time() < deadline, "no checkpoint was registered"
        time.sleep(0.05)


def registered_checkpoint(snapshot: Path) -> bool:
    try:
        state = json.loads(snapshot.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being written
        return False
    return state.get("latest_checkpoint_result") is not None


def run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.Popen(
        [sys.executable, "-m", "fewshot.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_stopped_run_continues_when_started_again(cluster, synthetic_store, tmp_path):
    args = ["train"] + [
        a
        for s in settings(
            synthetic_store, tmp_path, "train.steps=60", "train.eval_every=15", "name=stop"
        )
        for a in ("--set", s)
    ]
    driver = run_cli(args, tmp_path)
    first_checkpoint(shared(tmp_path) / "stop")
    driver.send_signal(signal.SIGINT)
    driver.wait(timeout=120)
    assert not (tmp_path / "stop" / "model.pt").exists()
    again = run_cli(args, tmp_path)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "stop" / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient()
    resumed = client.get_metric_history(run_id, "resumed_from_step")
    assert resumed and resumed[-1].value >= 15  # continued, not restarted
    assert client.get_run(run_id).data.metrics["test_acc"] > 0.2
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1  # one MLflow run


def test_more_workers_than_the_cluster_has_fail_fast(cluster, synthetic_store, tmp_path):
    config = load_config(
        None, settings(synthetic_store, tmp_path, "distributed.workers=16", "episode.meta_batch=16")
    )
    started = time.time()
    with pytest.raises(ConfigError, match="16 workers need 16 CPUs but the cluster has 2"):
        check_resources(config)
    gpus = load_config(None, settings(synthetic_store, tmp_path, "distributed.use_gpu=true"))
    with pytest.raises(ConfigError, match="GPUs but the cluster has 0"):
        check_resources(gpus)
    assert time.time() - started < 30


def test_submitted_job_trains_and_logs_its_model(cluster, synthetic_store, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("name: job\ntrain: {steps: 4, eval_every: 2}\n")
    db = tmp_path / "mlflow.db"
    overrides = settings(synthetic_store, tmp_path, "distributed.workers=1")
    args = [
        "submit",
        "train",
        "--config",
        str(config),
        "--address",
        cluster.dashboard,
        "--follow",
        "--tracking-uri",
        f"sqlite:///{db}",
        "--working-dir",
        str(REPO),
    ]
    args += [a for s in overrides for a in ("--set", s)]
    done = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "model")]
    assert artifacts == ["model/model.pt"]


def mapping_of(address: int) -> tuple[str, str]:
    """(permissions, device inode path) of this process's memory mapping at `address`."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms, _, device, inode, *path = line.split()
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return perms, f"{device} {inode} {' '.join(path)}"
    raise AssertionError(f"{address:#x} is not mapped")


@pytest.mark.parametrize("mode", ["memory", "episode"])
def test_workers_of_a_node_map_one_shared_copy_of_the_data(cluster, tiny_config, mode):
    """Two workers at once see the driver's one copy: the same shared object store file."""
    import ray

    config = tiny_config(f"data.decode={mode}")
    loop_config = {"data": share_datasets(config)}  # nested, as in train_loop_config

    @ray.remote(num_cpus=0.5, resources={"node_a": 0.5})  # both on one node
    def hold(loop_config: dict) -> tuple:
        data = shared_datasets(loop_config)
        images = data.train.images
        array = images.blobs if data.train.encoded else images.numpy()
        time.sleep(1)  # both workers hold the data at once
        first = EpisodeSampler(data.train, 5, 1, 3).episode(Stream.TRAIN, 0, 0)
        return mapping_of(array.ctypes.data), first.query_x

    held = ray.get([hold.remote(loop_config) for _ in range(2)])
    local = Datasets.load(config)
    expected = EpisodeSampler(local.train, 5, 1, 3).episode(Stream.TRAIN, 0, 0).query_x
    for (perms, file), query_x in held:
        assert perms.endswith("s")  # a MAP_SHARED mapping, not a private copy
        assert "plasma" in file and file == held[0][0][1]  # the same object store file
        assert torch.equal(query_x, expected)


ELASTIC = ("distributed.workers=[1, 2]", "distributed.placement=spread")  # one per node


def kill_after_first_checkpoint(cluster, storage: Path, node: str, log: dict) -> threading.Thread:
    """Take node `node` down as soon as the run has registered a checkpoint."""

    def kill() -> None:
        first_checkpoint(storage)
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        log["killed_after_step"] = snapshot["latest_checkpoint_result"]["metrics"]["step"]
        log["node"] = cluster.node_id(node)
        log["killed_at_s"] = time.monotonic()
        cluster.kill(node)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


@pytest.fixture
def revive(cluster):
    """Bring back, after the test, any worker node the test killed."""
    if not cluster.local:
        pytest.skip("takes a node down by PID on this machine; on a real cluster, by hand")
    yield
    for node in cluster.nodes:
        if node.name not in cluster.running():
            cluster.start_node(node.name)


@pytest.mark.timeout(600)
def test_elastic_run_loses_a_node_and_finishes_on_the_rest(
    cluster, revive, synthetic_store, tmp_path
):
    """workers [1, 2] spread over 2 nodes; node_b is killed after the first checkpoint.
    The run goes on with 1 worker from that checkpoint and takes every step; its weights
    equal a 1-worker run from the same checkpoint to the end (here, in this process)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.MlflowClient().create_run("0").info.run_id
    config = load_config(
        None,
        settings(
            synthetic_store,
            tmp_path,
            "train.steps=60",
            "train.eval_every=15",
            "train.threads=1",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "name=elastic",
            *ELASTIC,
            "distributed.max_failures=1",
            "distributed.keep_checkpoints=10",
        ),
    )
    timeline: dict = {}
    killer = kill_after_first_checkpoint(cluster, shared(tmp_path) / "elastic", "node_b", timeline)
    started = time.monotonic()
    model, metrics = fit_on_ray(config, run_id)
    killer.join()
    assert metrics["step"] == 60  # every step, with fewer workers
    assert metrics["placement"] == [cluster.node_id("node_a")]
    client = mlflow.MlflowClient()
    (resumed,) = client.get_metric_history(run_id, "resumed_from_step")
    assert resumed.value >= timeline["killed_after_step"] >= 15
    placements = [a.path for a in client.list_artifacts(run_id, "placement")]
    assert placements == ["placement/step_0.json", f"placement/step_{int(resumed.value)}.json"]
    print(  # the elastic timeline, for the record (pytest -s)
        f"killed node_b after step {timeline['killed_after_step']} at "
        f"{timeline['killed_at_s'] - started:.1f} s; resumed at step {resumed.value:.0f}; "
        f"finished step 60 at {time.monotonic() - started:.1f} s"
    )

    worker = Worker(config)  # 1 worker, from the checkpoint the run resumed from
    worker.load_state_dict(checkpoint_at(shared(tmp_path) / "elastic", resumed.value))
    fit(worker, lambda *_: None, lambda *_: None)
    expected = parameters(worker.method.state_dict())
    for name, value in parameters(model["state_dict"]).items():
        torch.testing.assert_close(value, expected[name], msg=name)


def checkpoint_at(storage: Path, step: float) -> dict:
    for directory in sorted(storage.glob("checkpoint_*")):
        state = model_file.load_ray_checkpoint(directory).worker
        if state["step"] == step:
            return state
    raise AssertionError(f"no checkpoint of step {step} in {storage}")


@pytest.mark.timeout(300)
def test_a_lost_node_without_retries_ends_the_run_with_one_line(
    cluster, revive, synthetic_store, tmp_path
):
    config = load_config(
        None,
        settings(
            synthetic_store,
            tmp_path,
            "train.steps=600",
            "train.eval_every=15",
            "tracking.enabled=false",
            "name=lost",
            "distributed.placement=spread",
        ),
    )
    timeline: dict = {}
    killer = kill_after_first_checkpoint(cluster, shared(tmp_path) / "lost", "node_b", timeline)
    with pytest.raises(FewShotError) as failed:
        fit_on_ray(config, None)
    killer.join()
    message = str(failed.value)
    assert "\n" not in message
    assert f"lost node {timeline['node'][:12]} (node_b)" in message
    assert "distributed.max_failures = 0" in message


def test_local_storage_on_several_nodes_is_refused(cluster, synthetic_store, tmp_path):
    overrides = [s for s in settings(synthetic_store, tmp_path) if "storage_path" not in s]
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match="storage_path: unset on a cluster of 2 worker nodes"):
        check_storage(config)
    mounted = load_config(None, settings(synthetic_store, tmp_path))
    assert check_storage(mounted) == str(shared(tmp_path))  # every node read the probe
    assert not list((shared(tmp_path)).glob(".fewshot-probe-*"))  # and it was removed


def test_data_is_held_once_per_node_however_many_workers_run_there(cluster, tmp_path):
    """Three workers get the data as Ray Train workers do (`share_datasets` here,
    `shared_datasets` there), two on node_a and one on node_b: each worker node's object
    store holds one copy, measured from its raylet's statistics, and node_a's second
    worker adds nothing to it."""
    import ray

    from fewshot.data.sources import synthetic

    store = tmp_path / "store"  # big enough that the data, not Ray's bookkeeping, shows
    synthetic.prepare(store, groups=(8, 2, 2), classes_per_group=10, images_per_class=40)
    config = load_config(None, [*settings(store, tmp_path), "data.decode=memory"])
    # What the driver puts in the object store: the arrays, pickled out of band.
    one_copy = len(pickle.dumps(Datasets.load(config).shared(), protocol=5))
    assert one_copy > 2e6
    loop_config = {"data": share_datasets(config)}

    @ray.remote(num_cpus=0.5)
    class Holder:
        def hold(self, loop_config: dict) -> int:
            self.data = shared_datasets(loop_config)
            return len(self.data.train.labels)

    ids = {node.name: cluster.node_id(node.name) for node in cluster.nodes}
    held, stored = [], []
    for node in ("node_a", "node_a", "node_b"):
        holder = Holder.options(resources={node: 0.1}).remote()
        assert ray.get(holder.hold.remote(loop_config)) == 3200  # 80 classes x 40
        held.append(holder)
        stored.append({name: store_bytes(node_id) for name, node_id in ids.items()})
    one_on_a, two_on_a, and_one_on_b = stored
    assert one_copy * 0.9 < one_on_a["node_a"] < one_copy * 1.3, (one_on_a, one_copy)
    assert one_on_a["node_b"] < one_copy * 0.1, one_on_a
    assert abs(two_on_a["node_a"] - one_on_a["node_a"]) < one_copy * 0.01, stored
    assert one_copy * 0.9 < and_one_on_b["node_b"] < one_copy * 1.3, (and_one_on_b, one_copy)


def test_job_submitted_with_rays_own_cli_trains_on_both_nodes(cluster, synthetic_store, tmp_path):
    """`ray job submit --working-dir . -- python jobs/train.py ...`, as a Ray user would:
    the job runs on the head, its 2 workers spread over the worker nodes."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = tmp_path / "job.yaml"
    config.write_text("name: rayjob\ntrain: {steps: 4, eval_every: 2}\n")
    db = tmp_path / "mlflow.db"
    overrides = settings(synthetic_store, tmp_path, "distributed.placement=spread")
    overrides.append(f"tracking.uri=sqlite:///{db}")
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit"]
    command += ["--address", cluster.dashboard, "--working-dir", ".", "--"]
    command += ["python", "jobs/train.py", "--config", str(config)]
    command += [a for s in overrides for a in ("--set", s)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (job_id,) = set(re.findall(r"raysubmit_\w+", done.stdout + done.stderr))
    assert JobSubmissionClient(cluster.dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    placement = client.download_artifacts(run.info.run_id, "placement/step_0.json")
    placement = json.loads(Path(placement).read_text())
    assert sorted(placement["ranks"].values()) == sorted(node_ids(cluster))
