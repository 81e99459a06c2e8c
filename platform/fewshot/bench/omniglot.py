"""`fewshot bench omniglot`: the Omniglot recipe's ablation and cross-validation.

The task is the one of Lake et al. (2015): within-alphabet 20-way 1-shot, one query per
class, on alphabets never seen in training. The small background sets are the only
data, merged at prepare time into 8 distinct alphabets and 242 characters (small2 loses
its copies of small1's Greek and Latin; data/sources/omniglot.py). Two protocols:

- two-way (no `folds` key): a row trains on one small set and tests on the other's
  alphabets with the config's own test episodes;
- leave-alphabets-out (`folds: F`): a row trains F models, fold f on every alphabet but
  those `leave_groups_out` (data/selection.py) holds out, and tests it within each
  held-out alphabet: `evaluate.episodes` fixed episodes per alphabet, n_way = min(20,
  its characters) (Tagalog: 17), one query per class. An episode is a pure function of
  (evaluate.seed, the alphabet's place among the sorted alphabets, its index), so every
  row is tested on the same episodes and rows are paired. The row's figure pools the
  episodes of all folds: with the same count per alphabet and the same alphabets per
  fold, that is the mean of the fold errors; its 95% CI is 1.96 * std / sqrt(episodes)
  over the pooled episodes. It measures the noise of the episode draw, not how the
  figure would move on other alphabets: the folds' spread in the table shows that.

A bench file (jobs/configs/bench/omniglot.yaml) holds `base`, the recipe every row
starts from, and `rows`, each a `name` and one of
- `set:` dotted settings of a training run (the recipe with one lever flipped);
- `test_set:` settings applied at test time only: the row reuses the model trained
  with the same training settings (test-time augmentation on or off);
- `ensemble:` a list of `set:` dicts, one per member, whose models' log-probabilities
  are averaged (members trained already by another row are reused); under the folds,
  one ensemble per fold of that fold's members;
- `teachers:` (with `set:`) a list of `set:` dicts whose models (under the folds, the
  fold's) teach the row's model (`distill.teachers`, train/distill.py); reused as
  `ensemble:` members are, and their minutes count in the row's.
A row with `curve: true` contributes its validation error over training minutes to
the plot (two-way only). Results: a markdown table, its rows as JSON (for `--only`),
and a PNG plot.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.bench import machine, read_results, table, write_results, write_table
from fewshot.config import Config, apply_overrides, as_dict, set_value, validate
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import ImageSet, load_split
from fewshot.data.selection import Fold, leave_groups_out
from fewshot.errors import ConfigError
from fewshot.evaluate import Accuracy, episode_accuracies, evaluate_method, mean_ci
from fewshot.methods.ensemble import Ensemble
from fewshot.model_file import from_run, with_settings
from fewshot.runtime import Runtime
from fewshot.streams import Stream
from fewshot.tracking import tracking_uri
from fewshot.train.runner import train

HUMAN_ERROR = 4.5  # % (Lake et al. 2015), the same task on the evaluation alphabets
ROW_KEYS = {"name", "set", "test_set", "ensemble", "teachers", "curve"}


def read_spec(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"bench file {path} does not exist; pass --config PATH to a YAML")
    import yaml

    spec = yaml.safe_load(path.read_text()) or {}
    for row in spec.get("rows") or []:
        unknown = set(row) - ROW_KEYS
        if unknown or "name" not in row:
            raise ConfigError(
                f"{path}: row {row.get('name', row)!r} has keys {sorted(unknown)}; a row has "
                f"{sorted(ROW_KEYS)} (see jobs/configs/bench/omniglot.yaml)"
            )
    if not spec.get("rows") or not spec.get("base"):
        raise ConfigError(f"{path}: a bench file has `base` and `rows`")
    folds = spec.get("folds")
    if folds is not None and (not isinstance(folds, int) or isinstance(folds, bool)):
        raise ConfigError(f"{path}: folds: {folds!r} is not a number of folds; use e.g. 4")
    for row in spec["rows"] if folds else []:
        if row.get("curve"):
            raise ConfigError(
                f"{path}: row {row['name']!r} has `curve`, which the folds protocol does not "
                "plot; drop it or the `folds` key"
            )
    return spec


def configured(base: dict, bench: str, settings: dict) -> Config:
    raw = copy.deepcopy(base)
    for key, value in settings.items():
        set_value(raw, key, value)
    set_value(raw, "tracking.experiment", bench)
    config = validate(raw)
    # A name from the training settings: rows that train the same model share it.
    key = json.dumps({k: v for k, v in as_dict(config).items() if k != "name"}, sort_keys=True)
    set_value(raw, "name", f"{bench}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    return validate(raw)


@dataclass(frozen=True)
class Trained:
    config: Config
    method: Any
    test: Accuracy  # on the config's own test episodes
    minutes: float  # wall clock of the training run, its final test included
    run_id: str | None
    run_dir: Path
    steps: int  # trained (fewer than train.steps under train.minutes)


class Models:
    """Trained models by training settings, so rows that test the same model reuse it."""

    def __init__(self) -> None:
        self.trained: dict[str, Trained] = {}

    def get(self, config: Config) -> Trained:
        if config.name not in self.trained:
            started = time.perf_counter()
            result = train(config, restart=True, progress=sys.stderr.isatty())
            minutes = (time.perf_counter() - started) / 60
            _, method = from_run(result.run_dir)
            self.trained[config.name] = Trained(
                config, method, result.test, minutes, result.run_id, result.run_dir, result.steps
            )
        return self.trained[config.name]


def validation_curve(run_id: str | None, uri: str | None) -> list[tuple[float, float]]:
    """(minutes since the run started, validation error %) of each validation round."""
    if run_id is None:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    start = client.get_run(run_id).info.start_time
    history = client.get_metric_history(run_id, "val_acc")
    return [((m.timestamp - start) / 60000, 100 * (1 - m.value)) for m in history]


def taught(row: dict, base: dict, bench: str, models: Models, fold: dict) -> tuple[dict, float]:
    """The row's `set` (with the `fold` settings), its `distill.teachers` the run
    directories of the row's `teachers` trained under the same `fold` settings; and
    the teachers' training minutes."""
    settings = {**(row.get("set") or {}), **fold}
    if not row.get("teachers"):
        return settings, 0.0
    teachers = [models.get(configured(base, bench, {**t, **fold})) for t in row["teachers"]]
    settings["distill.teachers"] = [str(t.run_dir) for t in teachers]
    return settings, sum(t.minutes for t in teachers)


def at_test_time(row: dict, config: Config, method) -> tuple[Config, Any]:
    """The row's `test_set` settings applied to a trained model (no training)."""
    overrides = [f"{key}={value}" for key, value in row["test_set"].items()]
    return with_settings(config, method, overrides)


def run_row(row: dict, base: dict, bench: str, models: Models) -> dict:
    if "ensemble" in row:
        members = [models.get(configured(base, bench, s or {})) for s in row["ensemble"]]
        config = members[0].config
        ensemble = Ensemble([m.method for m in members])
        test = config.eval_episode()
        images = load_split(config.data.path, config.data.test_split, config.data.image_size)
        sampler = EpisodeSampler(
            images, test.n_way, test.k_shot, test.q_query, within_group=config.eval_within_group()
        )
        episodes = sampler.fixed_episodes(
            config.evaluate.episodes, config.evaluate.seed, Stream.TEST
        )
        accuracy = mean_ci(episode_accuracies(ensemble, episodes))
        return summary(row, config, accuracy, sum(m.minutes for m in members), [])
    settings, teaching = taught(row, base, bench, models, {})
    trained = models.get(configured(base, bench, settings))
    config, method, accuracy = trained.config, trained.method, trained.test
    minutes, run_id = trained.minutes + teaching, trained.run_id
    if row.get("test_set"):
        tested, rebuilt = at_test_time(row, config, method)
        accuracy = evaluate_method(rebuilt, tested)
    curve = validation_curve(run_id, config.tracking.uri) if row.get("curve") else []
    return summary(row, config, accuracy, minutes, curve)


def test_ways(config: Config, characters: int) -> int:
    """Ways of a held-out alphabet's test episodes: evaluate.n_way, or all its characters
    where it has fewer (Tagalog: 17)."""
    return min(config.eval_episode().n_way, characters)


@functools.cache
def fold_images(path: Path, splits: tuple[str, ...], image_size: int) -> ImageSet:
    """Every character the folds draw on (the train splits, merged), loaded once."""
    return load_split(path, list(splits), image_size)


def fold_accuracies(method, config: Config, images: ImageSet, fold: Fold) -> list[float]:
    """Accuracy of each fixed test episode of `fold`: `evaluate.episodes` within each
    held-out alphabet, min(n_way, its characters) ways, keyed by the alphabet's place
    among all alphabets."""
    runtime = Runtime.of(config.train)
    method.to(runtime.device, memory_format=runtime.memory_format)
    e = config.eval_episode()
    groups = images.groups()
    alphabets = sorted(groups)
    accuracies: list[float] = []
    for alphabet in fold.held_out:
        labels = groups[alphabet]
        sampler = EpisodeSampler(
            images.take_classes(labels), test_ways(config, len(labels)), e.k_shot, e.q_query
        )
        key = alphabets.index(alphabet)
        episodes = (
            sampler.episode(Stream.TEST, config.evaluate.seed, key, i)
            for i in range(config.evaluate.episodes)
        )
        accuracies += episode_accuracies(method, episodes, runtime, config.evaluate.transductive)
    return accuracies


def run_folds(row: dict, base: dict, bench: str, models: Models, folds: int) -> dict:
    """A row under leave-alphabets-out cross-validation: one model per fold (shared with
    the rows of the same training settings), tested on the fold's alphabets."""
    members = row.get("ensemble") or [row.get("set") or {}]
    d = configured(base, bench, members[0] or {}).data
    images = fold_images(d.path, tuple(d.train_split), d.image_size)
    pooled: list[float] = []
    per_fold, minutes = [], 0.0
    for fold in leave_groups_out(images, folds):
        names = {"data.train_classes": [images.class_names[c] for c in fold.train]}
        if row.get("ensemble"):
            settings, teaching = [{**(s or {}), **names} for s in members], 0.0
        else:
            one, teaching = taught(row, base, bench, models, names)
            settings = [one]
        trained = [models.get(configured(base, bench, s)) for s in settings]
        config, method = trained[0].config, trained[0].method
        if len(trained) > 1:
            method = Ensemble([m.method for m in trained])
        fold_minutes = sum(m.minutes for m in trained) + teaching
        if row.get("test_set"):
            config, method = at_test_time(row, config, method)
        accuracies = fold_accuracies(method, config, images, fold)
        accuracy = mean_ci(accuracies)
        per_fold.append(
            {
                "held_out": fold.held_out,
                "ways": [test_ways(config, len(images.groups()[a])) for a in fold.held_out],
                "accuracy": [accuracy.mean, accuracy.ci95, accuracy.episodes],
                "minutes": fold_minutes,
                "steps": [m.steps for m in trained],
                "episodes": accuracies,  # per episode, in order: rows are paired on them
            }
        )
        pooled += accuracies
        minutes += fold_minutes
    return {
        "name": row["name"],
        "direction": f"{folds} folds",
        "machine": machine(),
        "steps": round(statistics.mean(s for f in per_fold for s in f["steps"])),
        "test_time_only": bool(row.get("test_set")),
        "transductive": config.evaluate.transductive,
        "minutes": minutes,
        "accuracy": {"20w1s": mean_ci(pooled)},
        "folds": per_fold,
        "curve": [],
    }


def summary(row: dict, config: Config, accuracy: Accuracy, minutes: float, curve) -> dict:
    d = config.data
    return {
        "name": row["name"],
        "direction": f"{'+'.join(d.train_split)} -> {d.test_split}",
        "minutes": minutes,
        "accuracy": {"20w1s": accuracy},
        "curve": curve,
    }


def run(
    path: Path, out: Path, only: list[str] | None = None, overrides: list[str] | None = None
) -> list[dict]:
    """Train and test every row (or those named in `only`), each from the bench's `base`
    with `overrides` (`--set`) applied; write the table to `out`."""
    spec = read_spec(path)
    spec["base"] = apply_overrides(copy.deepcopy(spec["base"]), overrides or [])
    bench = spec.get("name", path.stem)
    rows = [r for r in spec["rows"] if not only or r["name"] in only]
    if only and len(rows) != len(only):
        raise ConfigError(f"--only {only}: rows must be among {[r['name'] for r in spec['rows']]}")
    models = Models()
    folds = spec.get("folds")
    results = [
        run_folds(row, spec["base"], bench, models, folds)
        if folds
        else run_row(row, spec["base"], bench, models)
        for row in rows
    ]
    if only:
        order = [r["name"] for r in spec["rows"]]
        mine = {r["name"] for r in results}
        kept = [r for r in read_results(out) if r["name"] in order and r["name"] not in mine]
        results = sorted(kept + results, key=lambda r: order.index(r["name"]))
    write_results(out, results)
    if folds:
        write_folds(out, spec, results)
    else:
        write(out, spec, results)
        plot(out.with_suffix(".png"), results)
    return results


def write(out: Path, spec: dict, results: list[dict]) -> None:
    rows = [
        [
            r["name"],
            r["direction"],
            f"{100 * (1 - a.mean):.2f} ± {100 * a.ci95:.2f}",
            f"{100 * a.mean:.2f}",
            str(a.episodes),
            f"{r['minutes']:.1f}",
        ]
        for r in results
        for a in [r["accuracy"]["20w1s"]]
    ]
    write_table(
        out,
        "Omniglot: within-alphabet 20-way 1-shot from the small background sets",
        f"Bench `{spec.get('name', 'omniglot')}`. Every row trains on one small background "
        "set and is tested on the other's alphabets, never seen in training: within-"
        "alphabet 20-way 1-shot, one query per class, the same fixed episodes for every "
        f"row (paired). Error % ± 95% CI. People make {HUMAN_ERROR}% errors on this task. "
        "Run min: wall-clock minutes of the training runs (validation rounds and the test "
        "included; an ensemble adds its members'). "
        f"Recipe: {spec.get('recipe', '')} Machine: {machine()}.",
        ["row", "train -> test", "error % ± CI", "accuracy %", "episodes", "run min"],
        rows,
    )


def error(mean: float, ci95: float) -> str:
    return f"{100 * (1 - mean):.2f} ± {100 * ci95:.2f}"


def paired(episodes: list[float], reference: list[float]) -> tuple[float, float]:
    """Error points of a row minus a reference row's on the same episodes: the mean of
    the per-episode differences and its 95% CI (negative: fewer errors)."""
    differences = [100 * (r - e) for e, r in zip(episodes, reference, strict=True)]
    ci95 = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences))
    return statistics.mean(differences), ci95


def paired_with(compared: bool, *folds: dict) -> bool:
    """Whether a row is compared and every fold holds its episodes (rows kept from a run
    before they were recorded do not)."""
    return compared and all("episodes" in f for f in folds)


def pooled(result: dict) -> list[float]:
    return [a for f in result["folds"] for a in f["episodes"]]


def verdict(change: float, ci95: float) -> str:
    """Whether fewer errors (a negative change) is shown, its opposite, or neither."""
    if change + ci95 < 0:
        return "confirmed"
    if change - ci95 > 0:
        return "refuted"
    return "cannot tell (the CI spans 0)"


def write_folds(out: Path, spec: dict, results: list[dict]) -> None:
    rows = []
    first = results[0]
    for r in results:
        label = r["name"] + (" (test-time only, the models above)" if r["test_time_only"] else "")
        compared = r is not first
        for f, f0 in zip(r["folds"], first["folds"], strict=True):
            mean, ci95, episodes = f["accuracy"]
            held = ", ".join(
                f"{a} ({w}-way)" for a, w in zip(f["held_out"], f["ways"], strict=True)
            )
            versus = (
                signed(*paired(f["episodes"], f0["episodes"]))
                if paired_with(compared, f, f0)
                else "-"
            )
            steps = "+".join(str(s) for s in f.get("steps", [])) or "-"
            rows.append(
                [
                    label,
                    held,
                    error(mean, ci95),
                    versus,
                    str(episodes),
                    steps,
                    f"{f['minutes']:.1f}",
                ]
            )
        a = r["accuracy"]["20w1s"]
        rows.append(
            [
                f"**{label}: fold mean**",
                f"all {sum(len(f['held_out']) for f in r['folds'])} alphabets",
                f"**{error(a.mean, a.ci95)}**",
                signed(*paired(pooled(r), pooled(first)))
                if paired_with(compared, *r["folds"], *first["folds"])
                else "-",
                str(a.episodes),
                f"{r['steps']} (mean)",
                f"{r['minutes']:.1f}",
            ]
        )
    task = validate(spec["base"]).eval_episode()
    write_table(
        out,
        spec.get("title", "Omniglot: leave-alphabets-out cross-validation on the small sets"),
        f"Bench `{spec.get('name', 'omniglot')}`: generalisation figures. The two small "
        "background sets, merged (8 distinct alphabets, 242 characters), split into "
        f"{spec['folds']} folds; each fold's model trains on the other alphabets only and is "
        f"tested within each held-out alphabet: {task.n_way}-way {task.k_shot}-shot (an "
        f"alphabet of fewer characters: all of them), {task.q_query} "
        f"quer{'y' if task.q_query == 1 else 'ies'} per class, fixed episodes shared by every "
        "row (paired). Error % ± 95% CI; the fold mean pools every fold's episodes (the "
        "same count per alphabet, so it is the mean of the fold errors), its CI 1.96 * std "
        "/ sqrt(episodes) over them: the noise of the episode draw, not of which alphabets "
        "exist. Error change: points against the first row "
        f"({first['name']}) on the same episodes, negative for fewer errors, with the 95% "
        "CI of the per-episode differences (paired). Steps: trained per fold (a time "
        "budget, `train.minutes`, trains what fits). Run min: wall-clock minutes of each "
        "fold's training run (pre-training and its own final test included). "
        f"Recipe: {spec.get('recipe', '')} {machines(results)}",
        ["row", "held-out alphabets", "error % ± CI", "error change", "episodes", "steps",
         "run min"],
        rows,
    )  # fmt: skip
    if spec.get("claims"):
        with out.open("a") as markdown:
            markdown.write("\n" + "\n".join(claims_table(spec["claims"], results)) + "\n")


def machines(results: list[dict]) -> str:
    """The machine each row was measured on (rows kept from an `--only` run on another
    machine keep theirs): one sentence."""
    rows: dict[str, list[str]] = {}
    for r in results:
        rows.setdefault(r.get("machine", machine()), []).append(r["name"])
    if len(rows) == 1:
        return f"Machine: {next(iter(rows))}."
    return "Machines: " + "; ".join(f"{m} for {', '.join(n)}" for m, n in rows.items()) + "."


def signed(change: float, ci95: float) -> str:
    return f"{change:+.2f} ± {ci95:.2f}"


def claims_table(claims: list[dict], results: list[dict]) -> list[str]:
    """Each claim of a source (`better` makes fewer errors than `than`) against the folds:
    the paired error change of `better` against `than` and what it says."""
    by_name = {r["name"]: r for r in results}
    rows = []
    for claim in claims:
        compared = f"{claim['better']} vs {claim['than']}"
        if claim["better"] not in by_name or claim["than"] not in by_name:
            rows.append([claim["claim"], claim["source"], compared, "-", "not run"])
            continue
        change, ci95 = paired(pooled(by_name[claim["better"]]), pooled(by_name[claim["than"]]))
        rows.append(
            [claim["claim"], claim["source"], compared, signed(change, ci95), verdict(change, ci95)]
        )
    return [
        "## The sources' claims on the folds",
        "",
        "Error change of the first row named against the second, on the same episodes of "
        "every fold (paired 95% CI); a claim is confirmed when the whole CI is below 0, "
        "refuted when it is above, and cannot be told otherwise.",
        "",
        *table(["claim", "source", "rows", "error change", "verdict"], rows),
    ]


def plot(path: Path, results: list[dict]) -> None:
    """Validation error against training minutes for the rows with a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in results if r.get("curve")]
    if not curves:
        return
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for r in curves:
        minutes, error = zip(*r["curve"], strict=True)
        axes.plot(minutes, error, marker="o", markersize=3, label=f"{r['name']}")
    axes.axhline(HUMAN_ERROR, color="grey", linestyle="--", label=f"people ({HUMAN_ERROR}%)")
    axes.set_xlabel("training minutes (wall clock, 2-core CPU)")
    axes.set_ylabel("validation error % (within-alphabet 20-way 1-shot)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
