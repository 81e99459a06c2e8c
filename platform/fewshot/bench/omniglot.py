"""`fewshot bench omniglot`: the Omniglot recipe's ablation and cross-validation.

The task is the one of Lake et al. (2015): within-alphabet 20-way 1-shot, one query per
class, on alphabets never seen in training. The small background sets are the only
data: a row trains on one (`small1`) and tests on the other (`small2`), or the reverse.

A bench file (jobs/configs/bench_omniglot.yaml) holds `base`, the recipe every row
starts from, and `rows`, each a `name` and one of
- `set:` dotted settings of a training run (the recipe with one lever flipped);
- `test_set:` settings applied at test time only: the row reuses the model trained
  with the same training settings (test-time augmentation on or off);
- `ensemble:` a list of `set:` dicts, one per member, whose models' log-probabilities
  are averaged (members trained already by another row are reused).
A row with `curve: true` contributes its validation error over training minutes to
the plot. Results: a markdown table, its rows as JSON (for `--only`), and a PNG plot.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from fewshot.bench import machine, write_table
from fewshot.bench.methods import read_results, write_results
from fewshot.config import Config, as_dict, set_value, validate
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import load_split
from fewshot.errors import ConfigError
from fewshot.evaluate import Accuracy, episode_accuracies, evaluate_method, mean_ci
from fewshot.methods.ensemble import Ensemble
from fewshot.model_file import from_run, with_settings
from fewshot.streams import Stream
from fewshot.tracking import tracking_uri
from fewshot.train.runner import train

HUMAN_ERROR = 4.5  # % (Lake et al. 2015), the same task on the evaluation alphabets
ROW_KEYS = {"name", "set", "test_set", "ensemble", "curve"}


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
                f"{sorted(ROW_KEYS)} (see jobs/configs/bench_omniglot.yaml)"
            )
    if not spec.get("rows") or not spec.get("base"):
        raise ConfigError(f"{path}: a bench file has `base` and `rows`")
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


class Models:
    """Trained models by training settings, so rows that test the same model reuse it."""

    def __init__(self) -> None:
        self.trained: dict[str, tuple[Config, Any, Accuracy, float, str | None]] = {}

    def get(self, config: Config) -> tuple[Config, Any, Accuracy, float, str | None]:
        """(config, method, test accuracy, training minutes, MLflow run id)."""
        if config.name not in self.trained:
            started = time.perf_counter()
            result = train(config, restart=True, progress=sys.stderr.isatty())
            minutes = (time.perf_counter() - started) / 60
            _, method = from_run(result.run_dir)
            self.trained[config.name] = (config, method, result.test, minutes, result.run_id)
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


def run_row(row: dict, base: dict, bench: str, models: Models) -> dict:
    if "ensemble" in row:
        members = [models.get(configured(base, bench, s or {})) for s in row["ensemble"]]
        config = members[0][0]
        ensemble = Ensemble([m[1] for m in members])
        test = config.eval_episode()
        images = load_split(config.data.path, config.data.test_split, config.data.image_size)
        sampler = EpisodeSampler(
            images, test.n_way, test.k_shot, test.q_query, within_group=config.eval_within_group()
        )
        episodes = sampler.fixed_episodes(
            config.evaluate.episodes, config.evaluate.seed, Stream.TEST
        )
        accuracy = mean_ci(episode_accuracies(ensemble, episodes))
        return summary(row, config, accuracy, sum(m[3] for m in members), [])
    config, method, accuracy, minutes, run_id = models.get(
        configured(base, bench, row.get("set") or {})
    )
    if row.get("test_set"):
        overrides = [f"{key}={value}" for key, value in row["test_set"].items()]
        tested, rebuilt = with_settings(config, method, overrides)
        accuracy = evaluate_method(rebuilt, tested)
    curve = validation_curve(run_id, config.tracking.uri) if row.get("curve") else []
    return summary(row, config, accuracy, minutes, curve)


def summary(row: dict, config: Config, accuracy: Accuracy, minutes: float, curve) -> dict:
    d = config.data
    return {
        "name": row["name"],
        "direction": f"{'+'.join(d.train_split)} -> {d.test_split}",
        "minutes": minutes,
        "accuracy": {"20w1s": accuracy},
        "curve": curve,
    }


def run(path: Path, out: Path, only: list[str] | None = None) -> list[dict]:
    spec = read_spec(path)
    bench = spec.get("name", path.stem)
    rows = [r for r in spec["rows"] if not only or r["name"] in only]
    if only and len(rows) != len(only):
        raise ConfigError(f"--only {only}: rows must be among {[r['name'] for r in spec['rows']]}")
    models = Models()
    results = [run_row(row, spec["base"], bench, models) for row in rows]
    if only:
        order = [r["name"] for r in spec["rows"]]
        mine = {r["name"] for r in results}
        kept = [r for r in read_results(out) if r["name"] in order and r["name"] not in mine]
        results = sorted(kept + results, key=lambda r: order.index(r["name"]))
    write_results(out, results)
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
