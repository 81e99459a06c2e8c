"""A training run: run directory, resume, tracking, final evaluation.

    runs/NAME/config.yaml       the resolved config
    runs/NAME/checkpoint.pt     the last round's state, in-process runs (atomic writes;
                                Ray runs keep theirs in Ray's storage)
    runs/NAME/model.pt          the final weights with their config: what evaluate,
                                register and predict load; its presence marks the
                                run finished
    runs/NAME/mlflow_run_id     the MLflow run this training run logs to

The driver owns the MLflow run; whoever trains (this process, or rank 0 of a Ray
job) logs metrics into it. Starting a run whose directory holds an unfinished run
with the same config continues it: the same MLflow run, the same episodes from
the step after the last checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.config import Config, as_dict, resolved_yaml, validate
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split, require_splits, split_census
from fewshot.errors import CheckpointError, ConfigError, DataError
from fewshot.evaluate import Accuracy, episode_accuracies, episode_count, mean_ci
from fewshot.methods import FewShotMethod, build_method
from fewshot.runtime import Runtime
from fewshot.safety import load_weights, remove_inside
from fewshot.streams import Stream
from fewshot.tracking import Tracker, download_artifact
from fewshot.train.loop import Worker, fit


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_file(worker: Worker) -> dict:
    """What a trained model is on disk: weights plus everything needed to rebuild it."""
    return {
        "config": as_dict(worker.config),
        "channels": worker.sampler.images.images.shape[1],
        "state_dict": {k: v.cpu() for k, v in worker.method.state_dict().items()},
    }


def method_from_file(state: dict) -> tuple[Config, FewShotMethod]:
    config = validate(state["config"])
    method = build_method(config, state["channels"])
    method.load_state_dict(state["state_dict"])
    return config, method


def with_settings(config: Config, method: FewShotMethod, overrides: list[str]):
    """`config` with `--set` overrides, and the trained `method` rebuilt under it, so a
    test-time setting of the method (`method.test_views`, MAML's eval steps) applies."""
    from fewshot.config import apply_overrides

    changed = validate(apply_overrides(as_dict(config), overrides))
    rebuilt = build_method(changed, method.shape.channels)
    rebuilt.load_state_dict(method.state_dict())
    return changed, rebuilt


def load_model(source: str | Path, tracking_uri: str | None = None) -> tuple[Config, FewShotMethod]:
    """A trained method from a model.pt file, a run directory, or an MLflow run id."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        if path.suffix or os.sep in str(source):
            raise CheckpointError(
                f"{source}: no such model file or run directory; pass "
                "runs/NAME, a .pt file or an MLflow run id"
            )
        try:
            path = download_artifact(str(source), "model/model.pt", tracking_uri)
        except Exception as exc:  # MLflow raises several types for an unknown run id
            raise CheckpointError(
                f"{source}: not a run directory, file or MLflow run id with "
                f"a model ({type(exc).__name__}); check the id"
            ) from None
    state = load_weights(path, "a model file")
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise CheckpointError(f"{path}: not a fewshot model file; pass runs/NAME/model.pt")
    return method_from_file(state)


def check_test_split(config: Config, split: str | None = None) -> None:
    """Refuse, before anything trains or loads, a test split that cannot give the fixed
    test episodes (missing, too few classes or images, unreadable parts), naming the
    setting to change."""
    split = split or config.data.test_split
    e = config.eval_episode()
    counts, per_group = split_census(config.data.path, split)
    setting = "evaluate.n_way" if config.evaluate.n_way else "episode.n_way"
    within = config.eval_within_group()
    largest = max(per_group.values()) if within else len(counts)
    if largest < e.n_way:
        where = f"its largest group has {largest}" if within else f"it has {largest}"
        raise DataError(
            f"{setting}: {e.n_way} classes per test episode, but split {split!r} of "
            f"{config.data.path} cannot give them ({where}); lower {setting}"
            + (" or set evaluate.within_group=false" if within else "")
        )
    needed = e.k_shot + e.q_query
    if min(counts) < needed:
        raise DataError(
            f"split {split!r} of {config.data.path} has a class of {min(counts)} images, fewer "
            f"than the test episodes' k_shot + q_query = {needed}; lower evaluate.k_shot or "
            "evaluate.q_query"
        )


def evaluate_method(
    method: FewShotMethod, config: Config, episodes: int | None = None, split: str | None = None
) -> Accuracy:
    """Accuracy on the fixed test episodes of `config` (test split, eval shape, eval seed),
    computed where and how the config trains (device, precision, memory format)."""
    check_test_split(config, split)
    runtime = Runtime.of(config.train)
    method.to(runtime.device, memory_format=runtime.memory_format)
    e = config.eval_episode()
    test = load_split(config.data.path, split or config.data.test_split, config.data.image_size)
    sampler = EpisodeSampler(
        test, e.n_way, e.k_shot, e.q_query, within_group=config.eval_within_group()
    )
    count = episode_count(episodes, config.evaluate.episodes)
    fixed = sampler.fixed_episodes(count, config.evaluate.seed, Stream.TEST)
    return mean_ci(episode_accuracies(method, fixed, runtime))


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    test: Accuracy
    val_acc: float
    steps: int


class Progress:
    """Training progress: a rich bar on a terminal; elsewhere (a log file, a Ray job's
    output) one plain line every 5% of the steps. Silent when not `enabled`."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        self.total, self.every = total, max(1, total // 20)
        self.next_line = start + 1  # the first update prints, then every 5%
        if enabled and not self.lines:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, status="")
            self.bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k != "train_lr" and v == v}  # v == v: not NaN
        status = " ".join(f"{k} {v:.3f}" for k, v in shown.items())
        if self.bar:
            self.bar.update(self.task, completed=step, status=status)
        elif self.lines and (step >= self.next_line or step == self.total):
            print(f"train {step}/{self.total} {status}", file=sys.stderr, flush=True)
            self.next_line = (step // self.every + 1) * self.every

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def prepare_run_dir(config: Config, restart: bool) -> tuple[Path, str | None]:
    """The run directory, and the MLflow run id to continue, if any."""
    run_dir = config.train.output_dir / config.name
    if restart:
        remove_inside(run_dir, config.train.output_dir)
    saved = run_dir / "config.yaml"
    if saved.is_file() and saved.read_text() != resolved_yaml(config):
        raise CheckpointError(
            f"{run_dir} holds run {config.name!r} with a different config; choose another "
            "name (--set name=...) or pass --restart to discard it"
        )
    if (run_dir / "model.pt").is_file():
        raise CheckpointError(
            f"run {config.name!r} already finished in {run_dir}; choose another "
            "name or pass --restart"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(resolved_yaml(config))
    run_id_file = run_dir / "mlflow_run_id"
    return run_dir, run_id_file.read_text().strip() if run_id_file.is_file() else None


class RoundLogger:
    """The hooks of `fit` for a worker that logs (this process, or rank 0)."""

    def __init__(self, tracker: Tracker, progress: Progress | None = None) -> None:
        self.tracker, self.progress = tracker, progress
        self.last: dict[str, float] = {"val_acc": float("nan")}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.metrics(metrics, step)
        if self.progress:
            self.progress.update(step, {**metrics, **self.last})

    def round(self, worker: Worker, metrics: dict[str, float]) -> None:
        self.last.update(metrics)
        self.tracker.metrics(metrics, worker.step)


def log_runtime(tracker: Tracker, worker: Worker) -> None:
    """Say how this run computes (runtime.py): one line on stderr, and the choice as the
    run's `runtime.*` params. A run resumed elsewhere keeps its first machine's params
    and records the new choice as the tag `fewshot.runtime_on_resume`."""
    print(worker.runtime.line(), file=sys.stderr, flush=True)
    if worker.step == 0:
        tracker.params(worker.runtime.params())
    else:
        tracker.tags({"fewshot.runtime_on_resume": worker.runtime.line()})


def log_train_classes(tracker: Tracker, worker: Worker) -> None:
    """With data.train_classes (few base classes, e.g. miniImageNet-S), log which classes
    the run trains on: train_classes.json, a list of class names."""
    if worker.config.data.train_classes:
        tracker.text(json.dumps(worker.train_images.class_names, indent=2), "train_classes.json")


def fit_here(config: Config, run_dir: Path, tracker: Tracker, progress: bool) -> tuple[dict, dict]:
    """Train in this process, checkpointing to run_dir; returns (model file, last round's
    metrics)."""
    worker = Worker(config)
    log_train_classes(tracker, worker)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.is_file():
        worker.load_state_dict(load_weights(checkpoint, "a checkpoint (or pass --restart)"))
        tracker.metrics({"resumed_from_step": worker.step}, worker.step)
    log_runtime(tracker, worker)
    bar = Progress(config.train.steps, worker.step, progress)
    logger = RoundLogger(tracker, bar)

    def on_round(w: Worker, metrics: dict[str, float]) -> None:
        logger.round(w, metrics)
        save_atomic(w.state_dict(), checkpoint)

    try:
        fit(worker, logger.log, on_round)
    finally:
        bar.close()
    return model_file(worker), logger.last


def has_progress(config: Config, run_dir: Path) -> bool:
    """Whether a run has anything to continue from: a checkpoint here, or Ray's."""
    if any((run_dir / name).exists() for name in ("checkpoint.pt", "model.pt")):
        return True
    if config.distributed.workers:
        from fewshot.train.distributed import storage_path

        storage = storage_path(config)
        return "://" in storage or (Path(storage) / config.name).exists()
    return False


def train(config: Config, *, restart: bool = False, progress: bool = False) -> RunResult:
    """Train (here, or on Ray with `distributed.workers`), then evaluate on the fixed
    test episodes and log everything; with `registry.register`, register the model."""
    if config.registry.register and not config.tracking.enabled:
        raise ConfigError("registry.register: needs tracking.enabled=true (the registry is MLflow)")
    # Everything that can be known before training is checked before --restart deletes
    # the previous run: a mistake found after the last step would cost the whole run.
    d = config.data
    require_splits(d.path, [*d.train_split, *([d.val_split] if d.val_split else [])])
    check_test_split(config)
    fresh = not (config.train.output_dir / config.name).exists() or restart
    run_dir, resume_run_id = prepare_run_dir(config, restart)
    tracker = Tracker(config)
    run_id = tracker.start(resume_run_id)
    if run_id:
        (run_dir / "mlflow_run_id").write_text(run_id)
    status = "FAILED"
    try:
        if config.distributed.workers:
            from fewshot.train.distributed import fit_on_ray

            model, metrics = fit_on_ray(config, run_id, restart=restart)
        else:
            model, metrics = fit_here(config, run_dir, tracker, progress)
        _, method = method_from_file(model)
        test = evaluate_method(method, config)
        # model.pt marks the run finished, so it is written only after the test episodes
        # ran: a failed evaluation leaves a run that the corrected command continues.
        model_path = run_dir / "model.pt"
        save_atomic(model, model_path)
        tracker.metrics({"test_acc": test.mean, "test_ci95": test.ci95}, config.train.steps)
        tracker.table("evaluation", [evaluation_row(config, test)])
        tracker.artifact(model_path, "model")
        status = "FINISHED"
    except BaseException:
        # A run refused or failed before its first checkpoint leaves no directory that
        # would block the corrected config under the same name (its MLflow run says FAILED).
        if fresh and not has_progress(config, run_dir):
            remove_inside(run_dir, config.train.output_dir)
        raise
    finally:
        tracker.end(status)
    if config.registry.register:
        from fewshot.registry.versions import register

        register(run_id, config.registry.name or config.name, uri=config.tracking.uri)
    return RunResult(
        run_dir, run_id, test, metrics.get("val_acc", float("nan")), config.train.steps
    )


def evaluation_row(config: Config, accuracy: Accuracy) -> dict:
    e = config.eval_episode()
    return {
        "method": config.method.name,
        "backbone": config.backbone.name,
        "dataset": str(config.data.path),
        "split": config.data.test_split,
        "task": f"{e.n_way}-way {e.k_shot}-shot",
        "within_group": config.eval_within_group(),
        "episodes": accuracy.episodes,
        "accuracy": round(accuracy.mean, 4),
        "ci95": round(accuracy.ci95, 4),
    }
