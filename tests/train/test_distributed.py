"""Ray Train for real: a `ray start --head` on 127.0.0.1, workers killed by pid, jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from fewshot.config import load_config
from fewshot.data.episodes import EpisodeSampler
from fewshot.errors import ConfigError
from fewshot.streams import Stream
from fewshot.train.datasets import Datasets
from fewshot.train.distributed import check_resources, fit_on_ray
from fewshot.train.loop import Worker

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]


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
        "distributed.workers=2",
        *extra,
    ]


def parameters(state: dict) -> dict:
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.parametrize("method", ["protonet", "maml"])
def test_two_workers_take_exactly_the_steps_of_one(ray_head, synthetic_store, tmp_path, method):
    """2 workers with B/2 tasks each == 1 worker with B tasks (SGD: same gradients)."""
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
            f"name=eq-{method}",
            *extra,
        ),
    )
    model, _ = fit_on_ray(config, run_id=None)
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


def train_worker_pids() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if "RayTrainWorker" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])
    ]


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


def test_killed_worker_resumes_from_checkpoint_and_matches_unbroken_run(
    ray_head, synthetic_store, tmp_path
):
    common = settings(
        synthetic_store, tmp_path, "train.steps=60", "train.eval_every=15", "tracking.enabled=false"
    )
    unbroken, unbroken_metrics = fit_on_ray(load_config(None, [*common, "name=unbroken"]), None)
    faulty = load_config(None, [*common, "name=faulty", "distributed.max_failures=1"])
    killed: list[int] = []

    def kill_a_worker() -> None:
        first_checkpoint(tmp_path / "ray" / "faulty")
        pids = train_worker_pids()
        os.kill(pids[-1], signal.SIGKILL)
        killed.append(pids[-1])

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    model, metrics = fit_on_ray(faulty, None)
    killer.join()
    assert killed and killed[0] not in train_worker_pids()
    assert metrics["pid"] != killed[0]
    assert metrics["val_acc"] == pytest.approx(unbroken_metrics["val_acc"])
    for name, value in unbroken["state_dict"].items():
        torch.testing.assert_close(model["state_dict"][name], value, msg=name)


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


def test_stopped_run_continues_when_started_again(ray_head, synthetic_store, tmp_path):
    args = ["train"] + [
        a
        for s in settings(
            synthetic_store, tmp_path, "train.steps=60", "train.eval_every=15", "name=stop"
        )
        for a in ("--set", s)
    ]
    driver = run_cli(args, tmp_path)
    first_checkpoint(tmp_path / "ray" / "stop")
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


def test_more_workers_than_the_cluster_has_fail_fast(ray_head, synthetic_store, tmp_path):
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


def test_submitted_job_trains_and_logs_its_model(ray_head, synthetic_store, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("name: job\ntrain: {steps: 4, eval_every: 2}\n")
    db = tmp_path / "mlflow.db"
    overrides = settings(synthetic_store, tmp_path, "distributed.workers=1")
    args = [
        "submit",
        str(config),
        "--address",
        ray_head["dashboard"],
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
def test_workers_of_a_node_map_one_shared_copy_of_the_data(ray_head, tiny_config, mode):
    """Two workers at once see the driver's one copy: the same shared object store file."""
    import ray

    from fewshot.train.distributed import share_datasets, shared_datasets

    config = tiny_config(f"data.decode={mode}")
    loop_config = {"data": share_datasets(config)}  # nested, as in train_loop_config

    @ray.remote(num_cpus=1)
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
