"""A training run: its directory, resume, tracking and final evaluation.

The run directory (run_dir.py) holds the resolved config, the in-process checkpoint,
the final model file and the id of the MLflow run. The driver owns the MLflow run;
whoever trains (this process, or rank 0 of a Ray job) logs metrics into it. Starting a
run whose directory holds an unfinished run with the same config continues it: the
same MLflow run, the same episodes from the step after the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fewshot import model_file
from fewshot.config import Config, parse_overrides
from fewshot.data.reader import require_splits
from fewshot.errors import ConfigError
from fewshot.evaluate import Accuracy, check_test_split, evaluate_method, evaluation_row
from fewshot.run_dir import RunDir
from fewshot.runtime import check_threads
from fewshot.safety import remove_inside
from fewshot.tracking import Tracker, tracked_run
from fewshot.train.distributed import fit_on_ray, storage_path
from fewshot.train.hooks import Progress, RoundLogger, log_runtime, log_train_classes
from fewshot.train.loop import Worker, fit


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    test: Accuracy
    val_acc: float
    steps: int
    config: Config  # what it ran under


def fit_here(
    config: Config, run_dir: RunDir, tracker: Tracker, progress: bool
) -> tuple[dict, dict]:
    """Train in this process, checkpointing to run_dir; returns (model file, last round's
    metrics)."""
    worker = Worker(config)
    log_train_classes(tracker, worker)
    if run_dir.checkpoint.is_file():
        worker.load_state_dict(model_file.load_checkpoint(run_dir.checkpoint))
        tracker.metrics({"resumed_from_step": worker.step}, worker.step)
    log_runtime(tracker, worker)
    bar = Progress(config.train.steps, worker.step, progress)
    logger = RoundLogger(tracker, bar)

    def on_round(w: Worker, metrics: dict[str, float]) -> None:
        logger.round(w, metrics)
        model_file.save_checkpoint(w.state_dict(), run_dir.checkpoint)

    try:
        fit(worker, logger.log, on_round)
    finally:
        bar.close()
    return model_file.contents(config, worker.method), logger.last


def has_progress(config: Config, run_dir: RunDir) -> bool:
    """Whether a run has anything to continue from: a checkpoint here, or Ray's."""
    if run_dir.checkpoint.exists() or run_dir.model.exists():
        return True
    if config.distributed.workers:
        storage = storage_path(config)
        return "://" in storage or (Path(storage) / config.name).exists()
    return False


def test_and_save(config: Config, model: dict, run_dir: RunDir, tracker: Tracker) -> Accuracy:
    """Evaluate the model file `model` on the fixed test episodes, then write it as the
    run's model and log both."""
    _, method = model_file.build(model)
    test = evaluate_method(method, config)
    # model.pt marks the run finished, so it is written only after the test episodes ran:
    # a failed evaluation leaves a run that the corrected command continues.
    model_file.save(model, run_dir.model)
    tracker.metrics({"test_acc": test.mean, "test_ci95": test.ci95}, config.train.steps)
    tracker.table("evaluation", [evaluation_row(config, test)])
    tracker.artifact(run_dir.model, "model")
    return test


def train(config: Config, *, restart: bool = False, progress: bool = False) -> RunResult:
    """Train (here, or on Ray with `distributed.workers`), then evaluate on the fixed
    test episodes and log everything to the run's MLflow run."""
    # Everything that can be known before training is checked before --restart deletes
    # the previous run: a mistake found after the last step would cost the whole run.
    d = config.data
    require_splits(d.path, [*d.train_split, *([d.val_split] if d.val_split else [])])
    check_test_split(config)
    if not config.distributed.workers:  # Ray workers check their own machine's CPUs
        check_threads(config.train.threads)
    run_dir = RunDir.of(config)
    fresh = not run_dir.path.exists() or restart
    run_dir.start(config, restart, config.train.output_dir)
    try:
        with tracked_run(config, run_dir) as tracker:
            if config.distributed.workers:
                model, metrics = fit_on_ray(config, tracker.run_id, restart=restart)
            else:
                model, metrics = fit_here(config, run_dir, tracker, progress)
            test = test_and_save(config, model, run_dir, tracker)
    except BaseException:
        # A run refused or failed before its first checkpoint leaves no directory that
        # would block the corrected config under the same name (its MLflow run says FAILED).
        if fresh and not has_progress(config, run_dir):
            remove_inside(run_dir.path, config.train.output_dir)
        raise
    return RunResult(
        run_dir.path,
        tracker.run_id,
        test,
        metrics.get("val_acc", float("nan")),
        config.train.steps,
        config,
    )


def ensemble_model(sources: list[str], overrides: list[str]) -> tuple[Config, dict]:
    """The config and model file of an ensemble of the trained models at `sources` (run
    directories, model files or MLflow run ids; at least 2), read and checked, with
    nothing written. Its config is the first member's without its registration settings
    (`registry.register`, `registry.name`), then `overrides` (`name=...` at least):
    registering is for the ensemble's own command to ask, or a member trained with
    `registry.register` would make every ensemble of it a new version of the member's
    model. The gate's settings (`registry.margin`, `.confidence`) are kept."""
    if len(sources) < 2:
        raise ConfigError(f"ensemble of {len(sources)} model(s): give at least 2 members")
    members = [model_file.read(model_file.locate(s)) for s in sources]
    unregistered = {"registry.register": False, "registry.name": None}
    config = model_file.config_of(members[0]).updated(
        {**unregistered, **parse_overrides(overrides)}
    )
    return config, model_file.ensemble_contents(config, members, sources)


def combine(config: Config, model: dict, sources: list[str], *, restart: bool = False) -> RunResult:
    """An ensemble run: the model file `model` of the members at `sources`, under
    `config` (both from `ensemble_model`), tested on the fixed test episodes and saved
    like a trained run's, with nothing trained; the sources are tagged on its MLflow run
    (`fewshot.ensemble`)."""
    check_test_split(config)
    run_dir = RunDir.of(config)
    run_dir.start(config, restart, config.train.output_dir)
    tags = {
        "fewshot.method": f"ensemble of {len(sources)}: {config.method.name}",
        "fewshot.ensemble": ", ".join(sources),
    }
    try:
        with tracked_run(config, run_dir, tags=tags) as tracker:
            test = test_and_save(config, model, run_dir, tracker)
    except BaseException:
        if not run_dir.model.exists():
            remove_inside(run_dir.path, config.train.output_dir)
        raise
    return RunResult(run_dir.path, tracker.run_id, test, float("nan"), config.train.steps, config)
