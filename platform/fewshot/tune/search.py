"""`fewshot tune`: hyper-parameter search with Ray Tune over Ray Train runs.

    fewshot tune --config jobs/configs/tune/subspace.yaml [--set k=v ...]
    fewshot tune --resume tune_subspace        # continue an interrupted search
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune/X.yaml

The tune file (format in tune/space.py) names a base train config, a search space
over its dotted fields and the search settings; it is checked completely before a
trial starts.

How it runs (the Tune-over-Train pattern of Ray 2.60, Train V2: "Hyperparameter
Tuning with Ray Tune" in Ray Train's user guide):

- A trial is a function trainable (`run_trial`) that builds the trial's config (the
  base plus its sampled values, named `<search>-<trial id>`) and fits it with Ray
  Train (`fit_on_ray`, a `TorchTrainer`) with `TuneReportCallback()` among its
  RunConfig callbacks: every evaluation round's `val_acc` (and `round`) goes from
  rank 0 through Train to Tune, where the scheduler sees it. The Tuner gets a
  `ray.tune.RunConfig`; `Tuner(trainer)` is no longer accepted.
- Resources: a trial's Train run takes what its config's `distributed` section asks
  for (workers x cpus_per_worker, GPUs); every trial is a Ray Train run, so a base
  with workers: 0 gets 1. The trial's own process (the Train driver) only waits on
  its run, so it reserves `search.driver_cpus` CPUs (default 0) and 256 MiB of
  memory (`tune.with_resources`). `max_concurrent_trials` defaults to as many trials
  as the cluster's CPUs (and GPUs) hold at once, as Ray's guide recommends.
- Scheduler: ASHA (default) on `val_acc`, maximised, with `round` (evaluation rounds
  of the run, also across a resumed run) as its time, `grace_period` and
  `reduction_factor` from the file and max_t = the most rounds a trial runs; or none.
  Search: random (seeded `BasicVariantGenerator`) or Optuna's TPE (`OptunaSearch`).
- Validation is on held-out classes only (data.val_split or data.val_groups); the test
  split is touched once, by the best config's model, after the search.

What it writes:

    <train.output_dir>/<search>/search.yaml          the checked spec (resume reads it)
    <train.output_dir>/<search>/mlflow_run_id        the parent MLflow run
    <train.output_dir>/<search>/<search>-<trial>/    a trial's run directory (run_dir.py):
                                                     config.yaml, starts, mlflow_run_id,
                                                     model.pt and result.json once finished
    <train.output_dir>/<search>/model.pt, best_config.yaml, objective_vs_params.png
    <distributed.storage_path or train.output_dir/ray>/<search>    Tune's experiment
    <same>/<search>-<trial>                                        each trial's Train run

On several nodes, distributed.storage_path must be storage every node sees and MLflow
a shared tracking server (as for `fewshot train`); a trial's directory is on the node
that ran it, so the driver finds nested runs by their tags and takes a model it cannot
see from the trial's last Train checkpoint, which holds the same weights.

MLflow: one parent run for the search (the base config's params, `space.yaml`; at the
end params `best.<path>`, metric `best_val_acc`, `best_config.yaml`, the best trial's
model at `model/model.pt`, `objective_vs_params.png`, `trials.json`, and the test
accuracy of the best model, `test_acc` and `test_ci95`), and one nested run per trial
(tag mlflow.parentRunId) with its full config, its curve, `effective.json` (the values
the built method and optimiser hold) and, at the end, `best_val_acc`, `rounds` and the
tag `fewshot.stopped_early`.

Interrupting (Ctrl+C, or the driver's end) leaves Tune's experiment state; `--resume
NAME` restores it with `Tuner.restore(path, trainable=..., resume_errored=True)`:
finished trials are kept, unfinished ones continue from their Train checkpoint (their
Train run has the same name and storage), the rest start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot import model_file
from fewshot.config import Config, parse_overrides, resolved_yaml, validate
from fewshot.errors import ConfigError, FewShotError, Interrupted
from fewshot.evaluate import Accuracy, check_test_split, evaluate_method, evaluation_row
from fewshot.ray_cluster import connect
from fewshot.run_dir import RunDir
from fewshot.tracking import Tracker, git_commit, tracked_run, tracking_uri
from fewshot.train.distributed import check_resources, fit_on_ray, storage_path
from fewshot.train.loop import eval_rounds
from fewshot.train.runner import Lifecycle
from fewshot.tune.space import SEARCH_FILE, TuneSpec, load_saved, read_tune_file

DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for each trial's Train driver


def trial_dir(base: Config, search: str, trial_name: str) -> Path:
    return base.train.output_dir / search / trial_name


def run_trial(values: dict[str, Any], spec: dict, parent_run_id: str | None, commit: str) -> None:
    """One trial (runs in a Tune actor): a Ray Train run of the base config with `values`."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    search, base = spec["name"], validate(spec["base"])
    trial_id = ray.tune.get_context().get_trial_id()
    config = base.updated({**values, "name": f"{search}-{trial_id}"})
    run_dir = RunDir(trial_dir(base, search, config.name))
    if (saved := run_dir.result()) is not None:  # finished before an interruption: report, keep
        ray.tune.report(saved)
        return
    tags = {"fewshot.search": search, "fewshot.trial_id": trial_id, "git.commit": commit}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    train_trial(config, run_dir, tags, callbacks=[TuneReportCallback()])


def train_trial(config: Config, run_dir: RunDir, tags: dict[str, str], callbacks: list) -> None:
    """Train a trial's config on Ray Train in its directory, through the run lifecycle
    (a directory holding another config is refused, the nested MLflow run never left
    RUNNING); save its model, untested (trials never see the test split), and last of all
    its last round's metrics (`result.json`, which marks it finished)."""
    run = Lifecycle(config, run_dir, tags=tags)
    with run.started() as tracker:
        model, metrics = fit_on_ray(config, tracker.run_id, callbacks=callbacks)
        run.save(model)
    run_dir.write_result({k: v for k, v in metrics.items() if isinstance(v, int | float)})


@dataclass
class SearchResult:
    name: str
    search_dir: Path
    parent_run_id: str | None
    best_config: Config
    best: dict[str, Any]  # the best trial's row
    test: Accuracy
    rows: list[dict[str, Any]] = field(default_factory=list)  # every trial, best first
    paths: list[str] = field(default_factory=list)  # the searched fields
    failed: int = 0  # trials that raised (Tune's output has their tracebacks)


def concurrency(spec: TuneSpec) -> int:
    """search.max_concurrent_trials, else as many trials as the cluster's resources hold."""
    import ray

    if spec.search.max_concurrent_trials:
        return spec.search.max_concurrent_trials
    d = spec.base.distributed
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // (d.max_workers * d.cpus_per_worker + spec.search.driver_cpus))
    if d.use_gpu and d.gpus_per_worker:
        fits = min(fits, int(have.get("GPU", 0) // (d.max_workers * d.gpus_per_worker)))
    return max(1, fits)


def tuner_for(spec: TuneSpec, trainable, storage: str):
    """A new Tuner for the spec."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    s = spec.search
    scheduler = None
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="round",
            max_t=spec.max_rounds,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    limit = concurrency(spec)
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, max_concurrent = OptunaSearch(seed=s.seed), limit
    else:  # a seeded generator; it takes the concurrency limit itself
        search_alg, max_concurrent = (
            BasicVariantGenerator(max_concurrent=limit, random_state=s.seed),
            None,
        )
    return ray.tune.Tuner(
        trainable,
        param_space=spec.param_space(),
        tune_config=ray.tune.TuneConfig(
            metric=s.metric,
            mode="max",
            num_samples=s.num_samples,
            max_concurrent_trials=max_concurrent,
            scheduler=scheduler,
            search_alg=search_alg,
        ),
        run_config=ray.tune.RunConfig(name=spec.name, storage_path=storage),
    )


def locate(
    tune_file: Path | None, overrides: list[str] | None, resume: str | None
) -> tuple[TuneSpec, bool]:
    """The spec to run, and whether it continues a search."""
    if resume is None:
        if tune_file is None:
            raise ConfigError(
                "--config: give a tune file (jobs/configs/tune/X.yaml) or --resume NAME"
            )
        spec = read_tune_file(tune_file, overrides)
        if (spec.search_dir() / SEARCH_FILE).is_file():
            raise ConfigError(
                f"name: search {spec.name!r} already exists in {spec.search_dir()}; continue it "
                f"with --resume {spec.name}, or choose another name in the tune file"
            )
        return spec, False
    if tune_file is None:
        # Only where the search is may be given: it keeps every other setting.
        changes = parse_overrides(overrides or [])
        output_dir = changes.pop("train.output_dir", Config().train.output_dir)
        if changes:
            raise ConfigError(
                f"--set: a resumed search keeps its settings ({', '.join(changes)}); drop "
                "--set (only train.output_dir, where the search is, may be given)"
            )
        return load_saved(Path(output_dir) / resume), True
    given = read_tune_file(tune_file, overrides)
    if given.name != resume:
        raise ConfigError(f"--resume {resume}: {tune_file} describes search {given.name!r}")
    saved = load_saved(given.search_dir())
    if saved.as_dict() != given.as_dict():
        raise ConfigError(
            f"--resume {resume}: {tune_file} differs from the search as it was started; resume "
            "without --config, or start a new search under another name"
        )
    return saved, True


def run_search(
    tune_file: str | Path | None,
    overrides: list[str] | None = None,
    resume: str | None = None,
) -> SearchResult:
    """Run (or, with `resume`, continue) a search; evaluate the best config on the test
    episodes. FewShotError when interrupted (how to continue is in the message)."""

    spec, resuming = locate(Path(tune_file) if tune_file else None, overrides, resume)
    base = spec.base
    check_test_split(base)  # the best config is tested on it: know now, not after the search
    connect(base.distributed.address, dashboard=True)
    check_resources(base)
    search_dir = spec.search_dir()
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / SEARCH_FILE).write_text(spec.as_yaml())

    tags = {"fewshot.search": spec.name, "fewshot.role": "search"}
    with tracked_run(base.updated({"name": spec.name}), RunDir(search_dir), tags) as parent:
        if not parent.resumed:
            parent.text(spec.as_yaml(), "space.yaml")
        return run_tuner(spec, resuming, base, parent, search_dir)


def run_tuner(spec: TuneSpec, resuming: bool, base: Config, parent: Tracker, search_dir: Path):
    """Run the Tuner (restored when resuming) to its end; collect and conclude."""
    import ray.tune

    parent_id = parent.run_id
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, spec=spec.as_dict(), parent_run_id=parent_id, commit=git_commit()
        ),
        {"CPU": spec.search.driver_cpus, "memory": DRIVER_MEMORY},
    )
    storage = storage_path(base)
    experiment = f"{storage.rstrip('/')}/{spec.name}"
    if resuming and ray.tune.Tuner.can_restore(experiment):
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tuner_for(spec, trainable, storage)
    grid = tuner.fit()
    done = ended_trials(experiment)
    if done < spec.trials():
        raise Interrupted(
            f"search {spec.name} was interrupted with {done} of {spec.trials()} trials "
            f"done; continue it with: fewshot tune --resume {spec.name}"
        )
    rows = collect(spec, grid, parent_id)
    if not rows:
        first = next((r.error for r in grid if r.error), None)
        raise FewShotError(f"search {spec.name}: every trial failed; the first: {first}")
    result = conclude(spec, grid, rows, parent, search_dir)
    result.failed = grid.num_errors
    return result


def ended_trials(experiment: str) -> int:
    """Trials that ended (finished, stopped by the scheduler, or failed), as Tune's saved
    experiment state has them. The ResultGrid cannot tell: on an interruption Tune saves
    its state, then stops the running trials, and those read as terminated there."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    trials = ExperimentAnalysis(experiment).trials
    return sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)


def nested_run_ids(spec: TuneSpec, parent_id: str | None) -> dict[str, str]:
    """trial id -> its nested MLflow run, found by tags (trial directories may be on other
    nodes; the tracking server is shared)."""
    if not parent_id:
        return {}
    from mlflow import MlflowClient

    config = spec.base
    client = MlflowClient(tracking_uri(config.tracking.uri))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=10000,
    )
    return {r.data.tags["fewshot.trial_id"]: r.info.run_id for r in runs}


def collect(spec: TuneSpec, grid, parent_id: str | None) -> list[dict[str, Any]]:
    """One row per trial that reported: its values, best val_acc over its rounds, rounds
    run, whether the scheduler stopped it early. Each trial's nested MLflow run gets those
    and is ended; a trial the scheduler ended at its last round (ASHA stops every trial at
    max_t, possibly before its process saved the model) gets its model from its last
    checkpoint, which holds the final weights."""
    from mlflow import MlflowClient

    metric = spec.search.metric
    client = None
    run_ids = nested_run_ids(spec, parent_id)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        if "trial_id" not in metrics or metric not in metrics:
            continue
        frame = result.metrics_dataframe
        best = (
            float(frame[metric].max())
            if frame is not None and metric in frame
            else float(metrics[metric])
        )
        values = {path: result.config[path] for path in spec.space}
        name = f"{spec.name}-{metrics['trial_id']}"
        config = spec.trial_config(values, name)
        directory = trial_dir(spec.base, spec.name, name)
        rounds, total = int(metrics.get("round", 0)), eval_rounds(config)
        stopped = result.error is None and rounds < total
        model_path = RunDir(directory).model
        checkpoint = metrics.get("checkpoint_path")
        saved_here = False
        if result.error is None and not stopped and not model_path.is_file() and checkpoint:
            model_file.save(checkpoint_model(checkpoint), model_path)
            saved_here = True
        run_id = run_ids.get(metrics["trial_id"])
        row = {
            "trial": name,
            "values": values,
            "val_acc": best,
            "rounds": rounds,
            "max_rounds": total,
            "stopped_early": stopped,
            "error": str(result.error) if result.error else None,
            "run_id": run_id,
            "checkpoint_path": checkpoint,
        }
        rows.append(row)
        if run_id and config.tracking.enabled:
            client = client or MlflowClient(tracking_uri(config.tracking.uri))
            client.log_metric(run_id, "best_val_acc", best, step=rounds)
            client.log_metric(run_id, "rounds", rounds, step=rounds)
            client.set_tag(run_id, "fewshot.stopped_early", str(stopped).lower())
            if saved_here:
                client.log_artifact(run_id, str(model_path), "model")
            if result.error is None:  # its process may have been ended before the run was
                client.set_terminated(run_id, "FINISHED")
            elif client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")
    rows.sort(key=lambda r: r["val_acc"], reverse=True)
    return rows


def checkpoint_model(path: str) -> dict:
    """The model file inside a Train checkpoint of `worker_loop`."""
    return model_file.load_ray_checkpoint(path).model


def best_model(row: dict[str, Any], search_dir: Path) -> dict:
    """The best trial's model file: its final model, or its last checkpoint's if the
    scheduler stopped it early."""
    final = RunDir(search_dir / row["trial"]).model
    if final.is_file():
        return model_file.read(final, "a trial's model file")
    if not row["checkpoint_path"]:
        raise FewShotError(f"trial {row['trial']} left no model and no checkpoint")
    return checkpoint_model(row["checkpoint_path"])


def conclude(spec: TuneSpec, grid, rows: list[dict], parent: Tracker, search_dir: Path):
    """Log the best config, its model, the plot and the trials to the parent run; test the
    best model (only it) on the test episodes."""
    metric = spec.search.metric
    chosen = grid.get_best_result(metric, "max", scope="all")
    best = next(r for r in rows if r["trial"] == f"{spec.name}-{chosen.metrics['trial_id']}")
    config = spec.trial_config(best["values"], best["trial"])
    (search_dir / "best_config.yaml").write_text(resolved_yaml(config))
    parent.text(resolved_yaml(config), "best_config.yaml")
    if parent.enabled and parent.run_id:
        from mlflow.entities import Param

        params = [Param(f"best.{p}", str(v)[:500]) for p, v in best["values"].items()]
        parent.client.log_batch(parent.run_id, params=params)
    parent.metrics({"best_val_acc": best["val_acc"]}, 0)
    model = best_model(best, search_dir)
    best_path = RunDir(search_dir).model
    model_file.save(model, best_path)
    parent.artifact(best_path, "model")
    plot = search_dir / "objective_vs_params.png"
    plot_objective(spec, rows, best, plot)
    parent.artifact(plot)
    parent.table("trials", rows)
    _, method = model_file.build(model)
    test = evaluate_method(method, config)
    parent.metrics({"test_acc": test.mean, "test_ci95": test.ci95}, 0)
    parent.table("evaluation", [evaluation_row(config, test)])
    return SearchResult(
        spec.name, search_dir, parent.run_id, config, best, test, rows, list(spec.space)
    )


def plot_objective(spec: TuneSpec, rows: list[dict], best: dict, path: Path) -> None:
    """One scatter per searched field: the objective against the field's value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    paths = list(spec.space)
    figure = Figure(figsize=(4 * len(paths), 3.6), layout="constrained")
    axes = figure.subplots(1, len(paths), squeeze=False)[0]
    objective = [r["val_acc"] for r in rows]
    for ax, p in zip(axes, paths, strict=True):
        domain = spec.space[p]
        values = [r["values"][p] for r in rows]
        if domain.numeric():
            xs, best_x = values, best["values"][p]
        else:  # categories at 0..n-1, labelled
            labels = [str(v) for v in domain.args]
            xs = [labels.index(str(v)) for v in values]
            best_x = labels.index(str(best["values"][p]))
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, objective, alpha=0.7)
        ax.scatter([best_x], [best["val_acc"]], marker="*", s=200, color="red", label="best")
        if domain.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled decades only
        ax.set_xlabel(f"{p} ({domain.kind})")
        ax.set_ylabel(spec.search.metric)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    figure.suptitle(f"{spec.name}: {len(rows)} trials")
    figure.savefig(path, dpi=100)
