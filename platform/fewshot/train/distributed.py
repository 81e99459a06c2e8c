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
import tempfile
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
        # schedulers measure a trial's progress in it.
        report = {**metrics, "step": w.step, "round": eval_rounds(config, w.step)}
        report["pid"] = os.getpid()
        if comm.rank != 0:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as directory:
            model = model_file.contents(config, w.method)
            model_file.save_ray_checkpoint(directory, w.state_dict(), model)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))

    fit(worker, logger.log, on_round)


def check_resources(config: Config) -> None:
    """Refuse a request the cluster cannot meet, instead of waiting for it forever."""
    import ray

    d = config.distributed
    available = ray.cluster_resources()
    needs = {"CPU": d.workers * d.cpus_per_worker}
    if d.use_gpu:
        needs["GPU"] = d.workers * d.gpus_per_worker
    for resource, needed in needs.items():
        have = available.get(resource, 0)
        if needed > have:
            per = "cpus_per_worker" if resource == "CPU" else "gpus_per_worker"
            raise ConfigError(
                f"distributed.workers: {d.workers} workers need {needed:g} {resource}s but the "
                f"cluster has {have:g}; lower distributed.workers or distributed.{per}"
            )


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


def for_workers(config: Config) -> dict:
    """The config as workers need it: Ray runs them in other directories, so local
    paths and the tracking URI are made absolute here (on a multi-node cluster the
    data must be at the same path on every node, or on shared storage)."""
    tree = as_dict(config)
    tree["data"]["path"] = str(config.data.path.resolve())
    tree["train"]["output_dir"] = str(config.train.output_dir.resolve())
    tree["tracking"]["uri"] = tracking_uri(config.tracking.uri)
    return tree


def backend(config: Config) -> str:
    """torch.distributed's backend: NCCL for GPU workers, whose gradients it all-reduces
    in GPU memory; gloo on CPU. Named here, not left to Ray's default, so the choice is
    visible and tested."""
    return "nccl" if config.distributed.use_gpu else "gloo"


def storage_path(config: Config) -> str:
    return config.distributed.storage_path or str((config.train.output_dir / "ray").resolve())


def fit_on_ray(
    config: Config, run_id: str | None, restart: bool = False, callbacks: list | None = None
) -> tuple[dict, dict]:
    """Run the worker loop on Ray Train; returns (model file, last round's metrics).
    `callbacks` go into the Train run's RunConfig (Tune's TuneReportCallback, for one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = config.distributed
    connect(d.address)
    check_resources(config)
    storage = storage_path(config)
    if restart and "://" not in storage:
        remove_inside(Path(storage) / config.name, storage)
    data = share_datasets(config)
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = d.gpus_per_worker
    trainer = TorchTrainer(
        worker_loop,
        # The ref nested in the config is a borrowed ref in every worker: Ray keeps the
        # object alive while this driver holds `data` and the workers use it.
        train_loop_config={"config": for_workers(config), "run_id": run_id, "data": data},
        torch_config=TorchConfig(backend=backend(config)),
        scaling_config=ScalingConfig(
            num_workers=d.workers, use_gpu=d.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.error:
        raise FewShotError(f"training on Ray failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        state = model_file.load_ray_checkpoint(directory)
    return state.model, dict(result.metrics)
