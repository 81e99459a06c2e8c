"""`fewshot bench methods`: every method and ablation with one budget, tested on the
same fixed episodes.

A bench file (jobs/configs/bench/methods.yaml) holds `base`, a config every row starts
from; `tasks`, the test settings ([n_way, k_shot] pairs); and `rows`, each a `name`
and the settings (`set:`, dotted keys) that make it that method. Each row is trained
once with `fewshot train`'s code and evaluated on every task's fixed episodes of the
test split. A method whose classifier has n_way outputs (MAML, MTL, CFN's CIM/FRM)
cannot test at another n_way: it gets a second model trained at that n_way with the
same settings (the training minutes column adds both).

Every row's training is its own MLflow run; one more run, named after the bench
(its directory train.output_dir/BENCH), spans the whole bench and holds the table
(markdown and JSON) and one metric per row and task. The rows are also
kept as JSON beside the table: `--only ROW` retrains those rows and keeps the others.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any

import yaml

from fewshot.bench import machine, omniglot, read_results, write_results, write_table
from fewshot.config import Config, apply_overrides, set_value, validate
from fewshot.errors import ConfigError
from fewshot.evaluate import Accuracy, evaluate_method
from fewshot.model_file import from_run
from fewshot.tracking import Tracker
from fewshot.train.runner import Lifecycle, train


def read_bench(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"bench file {path} does not exist; pass --config PATH to a YAML")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"name", "base", "tasks", "rows"}
    if unknown or not spec.get("rows") or not spec.get("tasks"):
        raise ConfigError(
            f"{path}: a bench file has name, base, tasks and rows (got {sorted(spec)}); "
            "see jobs/configs/bench/methods.yaml"
        )
    return spec


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def row_config(base: dict, bench: str, row: dict, n_way: int | None = None) -> Config:
    raw = copy.deepcopy(base)
    for key, value in (row.get("set") or {}).items():
        set_value(raw, key, value)
    suffix = f"-{n_way}w" if n_way else ""
    set_value(raw, "name", f"{bench}-{slug(row['name'])}{suffix}")
    set_value(raw, "tracking.experiment", bench)
    if n_way:
        set_value(raw, "episode.n_way", n_way)
        set_value(raw, "episode.q_query", 5)  # keeps a 20-way step near a 5-way one's cost
    return validate(raw)


def test_config(config: Config, n_way: int, k_shot: int) -> Config:
    """`config` with its test episodes set to n_way-way k_shot-shot (ConfigError if the
    method cannot test at n_way)."""
    return config.updated({"evaluate.n_way": n_way, "evaluate.k_shot": k_shot})


def run(path: Path, out: Path, overrides: list[str] | None = None, only: list[str] | None = None):
    """Train and test every row (or the rows named in `only`); write the table to `out`.
    It all happens inside the bench's own run (the run lifecycle, train/runner.py), so a
    row that fails ends the bench's MLflow run FAILED, not RUNNING. A bench file with
    `folds:` (jobs/configs/bench/methods_folds.yaml) runs the leave-alphabets-out
    protocol of bench/omniglot.py instead."""
    if path.is_file() and "folds" in (yaml.safe_load(path.read_text()) or {}):
        return omniglot.run(path, out, only, overrides)
    spec = read_bench(path)
    bench = spec.get("name", path.stem)
    base = apply_overrides(copy.deepcopy(spec.get("base") or {}), overrides or [])
    rows = [r for r in spec["rows"] if not only or r["name"] in only]
    if only and len(rows) != len(only):
        known = [r["name"] for r in spec["rows"]]
        raise ConfigError(f"--only {only}: rows must be among {known}")
    # Restarted every time: a bench's run is its table, made again.
    bench_run = Lifecycle(bench_config(base, bench), restart=True)
    with bench_run.started() as tracker:
        results = [train_row(base, bench, row, spec["tasks"]) for row in rows]
        if only:  # keep the other rows of an earlier run of the same bench
            order = [r["name"] for r in spec["rows"]]
            mine = {r["name"] for r in results}
            kept = [r for r in read_results(out) if r["name"] in order and r["name"] not in mine]
            results = sorted(kept + results, key=lambda r: order.index(r["name"]))
        tasks = [tuple(t) for t in spec["tasks"]]
        write_results(out, results)
        write(out, bench, base, tasks, results)
        log(tracker, out, results)
    return results


def bench_config(base: dict, bench: str) -> Config:
    """The config of the bench's own run: the base, named and filed after the bench."""
    raw = copy.deepcopy(base)
    set_value(raw, "name", bench)
    set_value(raw, "tracking.experiment", bench)
    return validate(raw)


def train_row(base: dict, bench: str, row: dict, tasks: list) -> dict[str, Any]:
    """One row: trained (twice where its classifier is tied to n_way), tested on every
    task; its name, training minutes and accuracy per task."""
    trained: dict[int, tuple[Config, Any, Accuracy]] = {}  # n_way -> config, method, test
    minutes = 0.0
    accuracies: dict[str, Accuracy] = {}
    for n_way, k_shot in tasks:
        config = row_config(base, bench, row)
        try:
            test = test_config(config, n_way, k_shot)
        except ConfigError:  # the classifier is tied to the training n_way
            config = row_config(base, bench, row, n_way)
            test = test_config(config, n_way, k_shot)
        if config.episode.n_way not in trained:
            started = time.perf_counter()
            result = train(config, restart=True)
            minutes += (time.perf_counter() - started) / 60
            trained[config.episode.n_way] = (config, from_run(result.run_dir)[1], result.test)
        config, method, accuracy = trained[config.episode.n_way]
        if test.eval_episode() != config.eval_episode():  # train() tested the other shape
            accuracy = evaluate_method(method, test)
        accuracies[f"{n_way}w{k_shot}s"] = accuracy
    return {"name": row["name"], "minutes": minutes, "accuracy": accuracies}


def write(out: Path, bench: str, base: dict, tasks: list, results: list[dict]) -> None:
    header = ["method", *[f"{n}-way {k}-shot" for n, k in tasks], "training min"]
    rows = [
        [
            r["name"],
            *[
                f"{100 * a.mean:.2f} ± {100 * a.ci95:.2f}"
                for a in (r["accuracy"][f"{n}w{k}s"] for n, k in tasks)
            ],
            f"{r['minutes']:.1f}",
        ]
        for r in results
    ]
    episodes = next(iter(results[0]["accuracy"].values())).episodes if results else 0
    train = base.get("train", {})
    write_table(
        out,
        "Methods compared",
        f"Bench `{bench}`: every row trained on the same split with the same budget "
        f"({train.get('steps', '?')} meta-training steps of "
        f"{base.get('episode', {}).get('meta_batch', 4)} tasks; pre-training, where a "
        f"method has it, is counted in its minutes) and tested on the same {episodes} fixed "
        f"episodes per task; mean accuracy (%) ± 95% CI. Fixed-way methods have a second "
        f"model for 20-way. Machine: {machine()}.",
        header,
        rows,
    )


def log(tracker: Tracker, out: Path, results: list[dict]) -> None:
    """The table into the bench's MLflow run: one metric per row and task, the markdown
    and the JSON."""
    for step, r in enumerate(results):
        values = {f"{slug(r['name'])}.{task}": a.mean for task, a in r["accuracy"].items()}
        tracker.metrics({**values, f"{slug(r['name'])}.minutes": r["minutes"]}, step)
    tracker.artifact(out)
    tracker.table(
        "methods",
        [
            {
                "method": r["name"],
                "minutes": round(r["minutes"], 2),
                **{t: [round(a.mean, 4), round(a.ci95, 4)] for t, a in r["accuracy"].items()},
            }
            for r in results
        ],
    )
