"""A training run on this process: run directory, resume, tracking, final evaluation.

    runs/NAME/config.yaml       the resolved config
    runs/NAME/checkpoint.pt     the last round's full state (written atomically)
    runs/NAME/model.pt          the final weights with their config (what evaluate,
                                register and predict load)
    runs/NAME/mlflow_run_id     the MLflow run this training run logs to

Starting a run whose directory holds an unfinished checkpoint with the same
config continues it (the same MLflow run, the same episodes from the next step).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.config import Config, as_dict, config_hash, resolved_yaml, validate
from fewshot.data.episodes import TEST, EpisodeSampler
from fewshot.data.store import load_split
from fewshot.errors import CheckpointError
from fewshot.evaluate import Accuracy, episode_accuracies, mean_ci
from fewshot.methods import FewShotMethod, build_method
from fewshot.tracking import Tracker, download_artifact
from fewshot.train.loop import Runtime, Worker, fit


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_file(method: FewShotMethod, config: Config, channels: int) -> dict:
    return {"config": as_dict(config), "channels": channels, "state_dict": method.state_dict()}


def load_model(source: str | Path, tracking_uri: str | None = None) -> tuple[Config, FewShotMethod]:
    """A trained method from a model.pt/checkpoint.pt file, a run directory, or an
    MLflow run id."""
    path = Path(source)
    if path.is_dir():
        path = next(
            (path / f for f in ("model.pt", "checkpoint.pt") if (path / f).is_file()),
            path / "model.pt",
        )
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
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "config" not in state:
        raise CheckpointError(f"{path}: not a fewshot model file (no config inside)")
    config = validate(state["config"])
    method = build_method(config, state["channels"])
    weights = state["state_dict"] if "state_dict" in state else state["model"]
    method.load_state_dict(weights)
    return config, method


def evaluate_method(
    method: FewShotMethod, config: Config, episodes: int | None = None, split: str | None = None
) -> Accuracy:
    """Accuracy on the fixed test episodes of `config` (test split, eval shape, eval seed),
    computed where and how the config trains (device, precision, memory format)."""
    runtime = Runtime.of(config)
    method.to(runtime.device, memory_format=runtime.memory_format)
    e = config.eval_episode()
    test = load_split(config.data.path, split or config.data.test_split, config.data.image_size)
    sampler = EpisodeSampler(
        test, e.n_way, e.k_shot, e.q_query, within_group=config.eval_within_group()
    )
    fixed = sampler.fixed_episodes(episodes or config.evaluate.episodes, config.evaluate.seed, TEST)
    return mean_ci(episode_accuracies(method, fixed, runtime))


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    test: Accuracy
    val_acc: float
    steps: int


class Progress:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
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

    def update(self, step: int, status: str) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, status=status)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def prepare_run_dir(config: Config, restart: bool) -> tuple[Path, dict | None, str | None]:
    """The run directory, and the checkpoint and MLflow run id to resume from, if any."""
    run_dir = config.train.output_dir / config.name
    checkpoint = run_dir / "checkpoint.pt"
    if restart:
        shutil.rmtree(run_dir, ignore_errors=True)
    if not checkpoint.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(resolved_yaml(config))
        return run_dir, None, None
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state.get("config_hash") != config_hash(config):
        raise CheckpointError(
            f"{run_dir} holds run {config.name!r} with a different config; choose another "
            "name (--set name=...) or pass --restart to discard it"
        )
    if state["worker"]["step"] >= config.train.steps:
        raise CheckpointError(
            f"run {config.name!r} already finished in {run_dir}; choose another "
            "name or pass --restart"
        )
    run_id_file = run_dir / "mlflow_run_id"
    return run_dir, state, run_id_file.read_text().strip() if run_id_file.is_file() else None


def train_local(config: Config, *, restart: bool = False, progress: bool = False) -> RunResult:
    """Train on this process, evaluate on the test episodes, log everything."""
    run_dir, resume_state, resume_run_id = prepare_run_dir(config, restart)
    worker = Worker(config)
    if resume_state:
        worker.load_state_dict(resume_state["worker"])
    tracker = Tracker(config)
    run_id = tracker.start(resume_run_id)
    if run_id:
        (run_dir / "mlflow_run_id").write_text(run_id)
    bar = Progress(config.train.steps, worker.step, progress)
    last = {"val_acc": float("nan")}

    def on_log(step: int, metrics: dict[str, float]) -> None:
        tracker.metrics(metrics, step)
        bar.update(
            step,
            f"loss {metrics['train_loss']:.3f} acc {metrics['train_acc']:.3f}"
            f" val {last['val_acc']:.3f}",
        )

    def on_round(w: Worker, metrics: dict[str, float]) -> None:
        last.update(metrics)
        tracker.metrics(metrics, w.step)
        save_atomic(
            {"worker": w.state_dict(), "config_hash": config_hash(config)},
            run_dir / "checkpoint.pt",
        )

    status = "FAILED"
    try:
        fit(worker, on_log, on_round)
        bar.close()
        channels = worker.sampler.images.images.shape[1]
        model_path = run_dir / "model.pt"
        save_atomic(model_file(worker.method, config, channels), model_path)
        test = evaluate_method(worker.method, config)
        tracker.metrics({"test_acc": test.mean, "test_ci95": test.ci95}, worker.step)
        tracker.table("evaluation", [evaluation_row(config, test)])
        tracker.artifact(model_path, "model")
        status = "FINISHED"
    finally:
        bar.close()
        tracker.end(status)
    return RunResult(run_dir, run_id, test, last["val_acc"], worker.step)


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
