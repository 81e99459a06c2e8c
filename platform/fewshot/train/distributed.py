"""Ray Train: the worker loop of `train.loop` on W workers.

Each worker samples its own share of every meta-batch (`tasks_for_rank`); the loop's
one all-reduce per step sums gradients and metrics over the workers through
torch.distributed (gloo on CPU, NCCL on GPU: `backend`, set up by Ray's `TorchTrainer`,
which also makes each GPU worker's own GPU its current device).
Rank 0 logs into the driver's MLflow run and reports a checkpoint (full worker
state plus the model file) every evaluation round; the other ranks report metrics
only. A worker group that loses a worker is restarted from the last checkpoint
(`distributed.max_failures`), and a run started again with the same name
continues from it, because Ray keeps checkpoints under storage_path/NAME.

Data is held once per node, not once per worker (`share_datasets`): the driver reads
the splits once and puts them in Ray's object store as numpy arrays; each worker's
`ray.get` maps them read-only, zero-copy, from its node's shared memory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch

from fewshot import model_file
from fewshot.config import Config, as_dict, validate
from fewshot.errors import ConfigError, FewShotError
from fewshot.ray_cluster import connect
from fewshot.safety import remove_inside
from fewshot.tracking import Tracker, tracking_uri
from fewshot.train.comm import Comm
from fewshot.train.datasets import Datasets
from fewshot.train.hooks import RoundLogger, log_runtime, log_train_classes
from fewshot.train.loop import Worker, eval_rounds, fit


class TorchDistributedComm(Comm):
    """Sums over the workers of a torch.distributed process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(flat)
        return flat


def worker_loop(loop_config: dict) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    config = validate(loop_config["config"])
    context = ray.train.get_context()
    comm = TorchDistributedComm(context.get_world_rank(), context.get_world_size())
    cpus = config.distributed.cpus_per_worker
    worker = Worker(config, comm, shared_datasets(loop_config), cpus=cpus)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = model_file.load_ray_checkpoint(directory)
        worker.load_state_dict(state.worker)
    tracker = Tracker(config, enabled=comm.rank == 0, run_id=loop_config["run_id"])
    placement = log_placement(tracker, comm, worker.step)
    if checkpoint:
        tracker.metrics({"resumed_from_step": worker.step}, worker.step)
    else:  # what the built method and optimiser really hold (checked by the tune tests)
        tracker.text(json.dumps(worker.effective(), indent=2), "effective.json")
        log_train_classes(tracker, worker)
    if comm.rank == 0:
        log_runtime(tracker, worker)
    logger = RoundLogger(tracker)

    def on_round(w: Worker, metrics: dict[str, float]) -> None:
        logger.round(w, metrics)
        # `round` counts evaluation rounds over the whole run, resumed or not: Tune's
        # schedulers measure a trial's progress in it. A run that a budget shrank counts
        # as the configured run at the same fraction of training, so its last round is
        # the configured last (train/budget.py).
        rounds = eval_rounds(config, w.plan.asked_step(w.step))
        report = {**metrics, "step": w.step, "round": rounds}
        report["pid"] = os.getpid()
        report["placement"] = placement  # node id of each rank, as the run reports
        if comm.rank != 0:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as directory:
            model = model_file.contents(config, w.method)
            model_file.save_ray_checkpoint(directory, w.state_dict(), model)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))

    fit(worker, logger.log, on_round)


PLACEMENT = "placement/step_{}.json"


def log_placement(tracker: Tracker, comm: TorchDistributedComm, step: int) -> list[str]:
    """Which node each rank runs on, gathered once per (re)start of the worker group:
    printed, and logged by rank 0 as placement/step_N.json (an elastic run that lost a
    node logs a second placement, from the step it resumed at)."""
    import ray

    nodes: list[str | None] = [None] * comm.world_size
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if comm.rank != 0:
        return nodes
    for rank, node in enumerate(nodes):
        print(f"placement: rank {rank} of {comm.world_size} on node {node[:12]} (step {step})")
    ranks = {str(rank): node for rank, node in enumerate(nodes)}
    tracker.text(json.dumps({"step": step, "ranks": ranks}, indent=2), PLACEMENT.format(step))
    return nodes


def check_resources(config: Config) -> None:
    """Refuse a request the cluster cannot meet, instead of waiting for it forever (an
    elastic run needs room for its minimum)."""
    import ray

    d = config.distributed
    available = ray.cluster_resources()
    needs = {"CPU": d.min_workers * d.cpus_per_worker}
    if d.use_gpu:
        needs["GPU"] = d.min_workers * d.gpus_per_worker
    for resource, needed in needs.items():
        have = available.get(resource, 0)
        if needed > have:
            per = "cpus_per_worker" if resource == "CPU" else "gpus_per_worker"
            raise ConfigError(
                f"distributed.workers: {d.min_workers} workers need {needed:g} {resource}s but "
                f"the cluster has {have:g}; lower distributed.workers or distributed.{per}"
            )


def storage_path(config: Config) -> str:
    return config.distributed.storage_path or str((config.train.output_dir / "ray").resolve())


def worker_nodes() -> list[dict]:
    """The live nodes that can run a training worker (the head often runs none)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def check_storage(config: Config) -> str:
    """Where Ray keeps this run's checkpoints; refused at start when workers on other
    nodes could not read it. A restarted worker group, on any node, resumes from there.

    On one node any local path works. On several, an unset `storage_path` (this node's
    train.output_dir/ray) is refused, and a local path is probed: this process writes a
    marker there and a task on every worker node must read it back."""
    d = config.distributed
    storage = storage_path(config)
    nodes = worker_nodes()
    if len(nodes) < 2 or "://" in storage:
        return storage
    if d.storage_path is None:
        raise ConfigError(
            f"distributed.storage_path: unset on a cluster of {len(nodes)} worker nodes, so "
            f"checkpoints would go to {storage} on each node's own disk; set it to s3://, "
            "gs:// or a directory every node mounts"
        )
    blind = nodes_that_cannot_read(Path(storage), nodes)
    if blind:
        raise ConfigError(
            f"distributed.storage_path: {storage} is not visible on node(s) "
            f"{', '.join(n[:12] for n in blind)}; give a directory every node mounts, or "
            "s3:// or gs://"
        )
    return storage


def nodes_that_cannot_read(directory: Path, nodes: list[dict]) -> list[str]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f".fewshot-probe-{secrets.token_hex(8)}"
    marker.write_text(marker.name)

    @ray.remote(num_cpus=0)
    def reads(path: str, expected: str) -> bool:
        try:
            return Path(path).read_text() == expected
        except OSError:
            return False

    try:
        probes = {
            n["NodeID"]: reads.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker), marker.name)
            for n in nodes
        }
        return [node for node, probe in probes.items() if not ray.get(probe, timeout=60)]
    finally:
        marker.unlink()


def share_datasets(config: Config):
    """Read the splits of `config` here, once, and put them in Ray's object store; returns
    the ObjectRef that every worker gets.

    The put stores one copy in this node's object store (shared memory). A worker on
    another node that calls `ray.get` makes Ray's object manager pull the object into
    its own node's store once, however many workers of that node ask for it, and every
    worker of a node then maps that one copy: numpy arrays are deserialised zero-copy,
    as read-only views of the shared memory. So memory per node does not grow with
    workers per node. The copy lives as long as the returned ref, which the caller
    holds until training ends (a restarted worker group gets it again).

    `data.decode: auto` decides here, on the driver's node, for all nodes: its budget is
    at most 80% of the smallest node's object store, where the decoded copy must fit
    (Ray spills objects that do not fit to disk).
    """
    import ray

    stores = [
        node["Resources"].get("object_store_memory", 0)
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("object_store_memory")
    ]
    cap = 0.8 * min(stores) if stores else None
    return ray.put(Datasets.load(config, cap).shared())


def shared_datasets(loop_config: dict) -> Datasets:
    """A worker's view of the node's copy that `share_datasets` put; the arrays stay
    mapped as long as the worker holds the returned tensors."""
    import ray

    return Datasets.from_shared(ray.get(loop_config["data"]))


def for_workers(config: Config) -> Config:
    """The config as workers need it: Ray runs them in other directories, so local
    paths and the tracking URI are made absolute here (on a multi-node cluster the
    data must be at the same path on every node, or on shared storage)."""
    return config.updated(
        {
            "data.path": str(config.data.path.resolve()),
            "train.output_dir": str(config.train.output_dir.resolve()),
            "tracking.uri": tracking_uri(config.tracking.uri),
        }
    )


def backend(config: Config) -> str:
    """torch.distributed's backend: NCCL for GPU workers, whose gradients it all-reduces
    in GPU memory; gloo on CPU. Named here, not left to Ray's default, so the choice is
    visible and tested."""
    return "nccl" if config.distributed.use_gpu else "gloo"


def fit_on_ray(
    config: Config, run_id: str | None, restart: bool = False, callbacks: list | None = None
) -> tuple[dict, dict]:
    """Run the worker loop on Ray Train; returns (model file, last round's metrics).
    `callbacks` go into the Train run's RunConfig (Tune's TuneReportCallback, for one)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    d = config.distributed
    connect(d.address)
    check_resources(config)
    storage = check_storage(config)
    if restart and "://" not in storage:
        remove_inside(Path(storage) / config.name, storage)
    data = share_datasets(config)
    nodes = {n["NodeID"]: n for n in worker_nodes()}  # a dead node's resources are gone
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = d.gpus_per_worker
    trainer = TorchTrainer(
        worker_loop,
        # The ref nested in the config is a borrowed ref in every worker: Ray keeps the
        # object alive while this driver holds `data` and the workers use it.
        train_loop_config={"config": as_dict(for_workers(config)), "run_id": run_id, "data": data},
        torch_config=TorchConfig(backend=backend(config)),
        scaling_config=ScalingConfig(
            num_workers=d.workers,
            use_gpu=d.use_gpu,
            resources_per_worker=resources,
            placement_strategy=d.placement.upper(),
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        mistake = worker_mistake(error)
        raise mistake or FewShotError(failure_line(config, error, nodes)) from error
    finally:
        # Ray Train leaves its Ctrl+C handler installed, and the handler holds the run's
        # controller, whose config holds `data`: the data would stay in the object store
        # (on every node) for as long as this process lives. (Ray installs it only from
        # the main thread; a Tune trial runs in another.)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    with result.checkpoint.as_directory() as directory:
        state = model_file.load_ray_checkpoint(directory)
    return state.model, dict(result.metrics)


def worker_mistake(error: Exception) -> FewShotError | None:
    """The one-line error that workers raised (a run that diverged, `train.threads` above
    a node's CPUs), as they raised it; None when the run failed for another reason."""
    for failure in getattr(error, "worker_failures", {}).values():
        # Ray wraps what a worker raised, to carry its traceback as text.
        raised = getattr(failure, "_base_exc", failure)
        if isinstance(raised, FewShotError):
            return raised
    return None


# Ray's own resources; any other key a node offers is a label its operator gave it.
RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "accelerator_type:", "node:")


def failure_line(
    config: Config, error: Exception, nodes: dict[str, dict], wait_s: float = 10
) -> str:
    """One line for a failed run: when worker nodes it started on are gone, which ones
    and what to set; else Ray's own error. Ray marks a lost node dead after its health
    checks fail, a few seconds after the workers' error, hence the wait."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        lost = [node for node in nodes if node not in alive]
        if lost or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not lost:
        return f"training on Ray failed: {error}"
    described = ", ".join(describe_node(nodes[node]) for node in lost)
    return (
        f"training on Ray failed: lost node {described} with distributed.max_failures = "
        f"{config.distributed.max_failures}; run it again to continue from its last "
        "checkpoint, or let it go on by itself on the nodes that remain: raise "
        "distributed.max_failures and give distributed.workers as [min, max]"
    )


def describe_node(node: dict) -> str:
    """The node's id and the labels its operator gave it: `0372d9e489ba (node_b)`."""
    labels = [key for key in node["Resources"] if not key.startswith(RAY_RESOURCES)]
    return node["NodeID"][:12] + (f" ({', '.join(labels)})" if labels else "")
