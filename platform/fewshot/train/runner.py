"""A run's lifecycle, owned in one place (`Lifecycle`), and the two runs built on it:
a training run (`train`) and an ensemble run (`combine`).

Every run uses it: training, ensembles, Tune trials (tune/search.py), the table run of
`fewshot bench methods`, and the members and ensemble of `fewshot omniglot`. It owns:

- the run directory (run_dir.py): started with the different-config check, refused
  when finished (a caller that skips finished runs asks `RunDir.finished`, or a
  trial's `RunDir.result`, first), one line in `starts` per start;
- the MLflow run (tracking.tracked_run): created, or reopened from the directory's
  `mlflow_run_id`, and ended FINISHED, KILLED (interrupted, to be continued) or FAILED:
  never left RUNNING;
- the removal of a run that failed before its first checkpoint, so that the corrected
  config may reuse the name;
- the final test and save (`test_and_save`; a Tune trial only `save`s: trials never
  see the test split);
- registration when the config asks (`registry.register`), after the MLflow run ended
  FINISHED, by the `register` function it is given: training does not import the
  registry (pipeline.py gives it), and a run that asks to be registered without
  tracking is refused before anything is written.

The driver owns the MLflow run; whoever trains (this process, or rank 0 of a Ray job)
logs metrics into it. Starting a run whose directory holds an unfinished run with the
same config continues it: the same MLflow run, the same episodes from the step after
the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

# Registers the model of the finished MLflow run (its id) as the config's registry asks.
Register = Callable[[str, Config], object]


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    test: Accuracy
    val_acc: float
    steps: int  # trained: train.steps, or fewer under train.minutes
    config: Config  # what it ran under


class Lifecycle:
    """One run of `config` in `run_dir` (default: train.output_dir/NAME), from its start
    to its end; `started()` is the block the run's work happens in."""

    def __init__(
        self,
        config: Config,
        run_dir: RunDir | None = None,
        *,
        restart: bool = False,
        tags: dict[str, str] | None = None,
        register: Register | None = None,
    ) -> None:
        if register and config.registry.register and not config.tracking.enabled:
            raise ConfigError(
                "registry.register: needs tracking.enabled=true (the registry is MLflow); "
                "set tracking.enabled=true or registry.register=false"
            )
        self.config = config
        self.dir = run_dir or RunDir.of(config)
        self.restart = restart
        self.tags = tags  # added to a new MLflow run's own
        self.register = register
        self.tracker: Tracker | None = None  # the MLflow run's, once started

    @contextmanager
    def started(self) -> Iterator[Tracker]:
        """Start (or continue) the run; yield its MLflow run's Tracker; end that FINISHED,
        KILLED or FAILED; then register the model when the config asks."""
        config, root = self.config, self.config.train.output_dir
        fresh = self.restart or not self.dir.path.exists()
        self.dir.start(config, self.restart, root)
        self.dir.record_start()
        try:
            with tracked_run(config, self.dir, self.tags) as tracker:
                self.tracker = tracker
                yield tracker
        except BaseException:
            # A run refused or failed before its first checkpoint leaves no directory that
            # would block the corrected config under the same name (its MLflow run says FAILED).
            if fresh and not has_progress(config, self.dir):
                remove_inside(self.dir.path, root)
            raise
        if self.register and config.registry.register:
            self.register(tracker.run_id, config)

    def save(self, model: dict) -> None:
        """Write the model file `model` as the run's model, which marks it finished, and
        log it."""
        model_file.save(model, self.dir.model)
        self.tracker.artifact(self.dir.model, "model")

    def test_and_save(self, model: dict) -> Accuracy:
        """Evaluate the model file `model` on the fixed test episodes, then save it and log
        both."""
        _, method = model_file.build(model)
        test = evaluate_method(method, self.config)
        # model.pt marks the run finished, so it is written only after the test episodes ran:
        # a failed evaluation leaves a run that the corrected command continues.
        self.save(model)
        self.tracker.metrics(
            {"test_acc": test.mean, "test_ci95": test.ci95}, self.config.train.steps
        )
        self.tracker.table("evaluation", [evaluation_row(self.config, test)])
        return test


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


def train(
    config: Config,
    *,
    restart: bool = False,
    progress: bool = False,
    register: Register | None = None,
) -> RunResult:
    """Train (here, or on Ray with `distributed.workers`), then evaluate on the fixed
    test episodes and log everything to the run's MLflow run; registered by `register`
    when the config asks (with none, nothing is registered)."""
    run = Lifecycle(config, restart=restart, register=register)
    # Everything that can be known before training is checked before --restart deletes
    # the previous run: a mistake found after the last step would cost the whole run.
    d = config.data
    require_splits(d.path, [*d.train_split, *([d.val_split] if d.val_split else [])])
    check_test_split(config)
    for teacher in config.distill.teachers:
        model_file.locate(teacher, config.tracking.uri)
    if not config.distributed.workers:  # Ray workers check their own machine's CPUs
        check_threads(config.train.threads)
    with run.started() as tracker:
        if config.distributed.workers:
            model, metrics = fit_on_ray(config, tracker.run_id, restart=restart)
        else:
            model, metrics = fit_here(config, run.dir, tracker, progress)
        test = run.test_and_save(model)
    return RunResult(
        run.dir.path,
        tracker.run_id,
        test,
        metrics.get("val_acc", float("nan")),
        int(metrics.get("step", config.train.steps)),  # fewer under a time budget
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


def combine(
    config: Config,
    model: dict,
    sources: list[str],
    *,
    restart: bool = False,
    register: Register | None = None,
) -> RunResult:
    """An ensemble run: the model file `model` of the members at `sources`, under
    `config` (both from `ensemble_model`), tested on the fixed test episodes and saved
    like a trained run's, with nothing trained; the sources are tagged on its MLflow run
    (`fewshot.ensemble`). Registered by `register` when `config` asks."""
    tags = {
        "fewshot.method": f"ensemble of {len(sources)}: {config.method.name}",
        "fewshot.ensemble": ", ".join(sources),
    }
    run = Lifecycle(config, restart=restart, tags=tags, register=register)
    check_test_split(config)
    with run.started() as tracker:
        test = run.test_and_save(model)
    return RunResult(run.dir.path, tracker.run_id, test, float("nan"), config.train.steps, config)
