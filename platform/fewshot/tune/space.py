"""The tune file: a base train config, a search space over its fields, search settings.

    name: tune_subspace                  # the search's name: its directory and MLflow run
    base: ../train/omniglot_subspace_5w1s.yaml   # a train config, relative to this file
                                         # (or a mapping)
    set: {data.val_groups: 1, train.steps: 300}   # dotted overrides of base (optional)
    space:                               # dotted config field -> one distribution
      method.lambda1: {loguniform: [0.001, 1.0]}  # low > 0, drawn on a log scale
      method.lambda2: {uniform: [0.0, 1.0]}
      method.n_subspaces: {choice: [1, 2, 4]}     # one of the values, at random
      method.subspace_dim: {randint: [8, 17]}     # an integer low..high-1: HIGH IS EXCLUSIVE
      train.lr: {grid: [0.001, 0.003]}            # every value, num_samples draws of the rest
    search:
      metric: val_acc          # maximised; measured on the validation classes only
      num_samples: 8           # trials (times the number of grid combinations)
      max_concurrent_trials: 2 # unset: as many as the cluster has resources for
      scheduler: asha          # or none; ASHA may stop a trial after an evaluation round
      grace_period: 1          # evaluation rounds every trial runs before ASHA may stop it
      reduction_factor: 2
      algorithm: random        # or optuna (TPE); optuna takes no grid
      seed: 0
      driver_cpus: 0           # CPUs reserved for each trial's Train driver (see search.py)

`fewshot tune --set k=v` overrides the base config after `set`. Everything is checked
here, before a trial starts: unknown keys (pydantic, extra=forbid), each space path
against the fields of the resolved base config (method settings included), each
distribution's bounds, and a config built with each bound or value through the
config's own validation, so a wrong type fails with its one-line error prefixed with
`space.<path>:`. The base needs validation classes (data.val_split or data.val_groups):
trials are scored on those, never on the test classes. Each trial is a Ray Train run,
so a base with distributed.workers: 0 gets 1 worker.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from fewshot.config import (
    Config,
    RunName,
    Section,
    _raise,
    as_dict,
    flatten,
    parse_overrides,
    read_yaml,
    set_value,
    validate,
)
from fewshot.errors import ConfigError
from fewshot.train.distributed import for_workers
from fewshot.train.loop import eval_rounds

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGES = ("uniform", "loguniform", "randint")
# The fields that decide how many evaluation rounds a trial runs (ASHA's max_t).
ROUND_FIELDS = ("train.steps", "train.eval_every", "pretrain.steps")
SEARCH_FILE = "search.yaml"  # the resolved tune file, in the search's directory


class Domain(Section):
    """One entry of `space`: exactly one of the kinds."""

    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None
    randint: list[int] | None = None  # Ray's randint: high is exclusive
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    def given(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) is not None]

    @property
    def kind(self) -> str:
        return self.given()[0]

    @property
    def args(self) -> list[Any]:
        return list(getattr(self, self.kind))

    def candidates(self) -> list[Any]:
        """The values a config is checked with: both ends of a range, every listed value."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]
        return self.args

    def numeric(self) -> bool:
        return self.kind in RANGES or all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in self.args
        )

    def tune_domain(self):
        """The Ray Tune domain."""
        from ray import tune

        kind, args = self.kind, self.args
        if kind == "grid":
            return tune.grid_search(args)
        if kind == "choice":
            return tune.choice(args)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[
            kind
        ](*args)

    def as_yaml(self) -> dict[str, list]:
        return {self.kind: self.args}


class SearchSettings(Section):
    metric: Literal["val_acc"] = "val_acc"  # maximised, on the validation classes
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: what the cluster fits
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # evaluation rounds before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1)
    algorithm: Literal["random", "optuna"] = "random"
    seed: int = 0
    # CPUs each trial's Train driver reserves. 0: none (it only waits on its Train run;
    # the workers hold the CPUs), so a 2-CPU machine runs two 1-worker trials at once.
    driver_cpus: float = Field(0.0, ge=0)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _none_is_none(cls, value: Any) -> Any:
        return "none" if value is None else value


class TuneFile(Section):
    name: RunName
    base: str | dict[str, Any]
    set: dict[str, Any] = {}
    space: dict[str, Domain] = Field(min_length=1)
    search: SearchSettings = SearchSettings()


@dataclass
class TuneSpec:
    """A checked tune file. `base` is the validated base config as trials get it
    (absolute paths, distributed.workers >= 1)."""

    name: str
    base: Config
    space: dict[str, Domain]
    search: SearchSettings
    max_rounds: int  # the most evaluation rounds a trial can run

    def trial_config(self, values: dict[str, Any], name: str) -> Config:
        """The base config with a trial's sampled values (dotted paths), named `name`."""
        return self.base.updated({**values, "name": name})

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param_space, keyed by dotted path."""
        return {path: domain.tune_domain() for path, domain in self.space.items()}

    def trials(self) -> int:
        grids = [len(d.grid) for d in self.space.values() if d.kind == "grid"]
        return self.search.num_samples * math.prod(grids)

    def search_dir(self) -> Path:
        return self.base.train.output_dir / self.name

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": as_dict(self.base),
            "space": {path: d.as_yaml() for path, d in self.space.items()},
            "search": self.search.model_dump(mode="json"),
        }

    def as_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)


def read_tune_file(path: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """Read and check a tune file; `overrides` (`--set k=v`) apply to its base config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"tune file {path} does not exist; pass --config jobs/configs/tune/X.yaml"
        )
    return parse_tune(read_yaml(path), path.parent, overrides)


def parse_tune(raw: dict[str, Any], root: Path, overrides: list[str] | None = None) -> TuneSpec:
    """A checked TuneSpec from a tune file's contents; `root` is where `base` is relative to."""
    try:
        spec = TuneFile.model_validate(raw)
    except ValidationError as exc:
        _raise(exc)
    if isinstance(spec.base, str):
        base_path = root / spec.base
        if not base_path.is_file():
            raise ConfigError(
                f"base: {base_path} does not exist; give a train config relative to the tune "
                "file (or the base config itself as a mapping)"
            )
        base = read_yaml(base_path)
    else:
        base = copy.deepcopy(spec.base)
    changes = {**spec.set, **parse_overrides(overrides or [])}
    if not changes.get("distributed.workers", (base.get("distributed") or {}).get("workers")):
        changes["distributed.workers"] = 1  # every trial is a Ray Train run
    for path, value in changes.items():
        set_value(base, path, value)
    config = validate(base)
    if not (config.data.val_split or config.data.val_groups):
        raise ConfigError(
            "data.val_split: tune needs validation classes: set data.val_split, or "
            "data.val_groups to hold groups of the train split out (trials never see the "
            "test classes)"
        )
    config = for_workers(config)
    check_space(config, spec.space, spec.search)
    rounds = max_rounds(config, spec.space)
    s = spec.search
    if s.scheduler == "asha" and s.grace_period > rounds:
        raise ConfigError(
            f"search.grace_period: {s.grace_period} rounds, but a trial runs at most {rounds} "
            "evaluation rounds (train.steps / train.eval_every); lower it or evaluate more often"
        )
    return TuneSpec(spec.name, config, spec.space, spec.search, rounds)


def check_space(base: Config, space: dict[str, Domain], search: SearchSettings) -> None:
    """Refuse a space that a trial would fail on (ConfigError: space.<path>: ...)."""
    fields = flatten(as_dict(base))
    for path, domain in space.items():
        given = domain.given()
        if len(given) != 1:
            raise ConfigError(
                f"space.{path}: give exactly one of {', '.join(KINDS)} (got {given or 'none'})"
            )
        if path == "name" or path not in fields:
            raise ConfigError(
                f"space.{path}: not a field of the base config; use a dotted path such as "
                "method.lambda1 or train.lr (`fewshot train --config BASE --dry-run` lists them)"
            )
        kind, args = domain.kind, domain.args
        where = f"space.{path}.{kind}"
        if kind in RANGES:
            if len(args) != 2:
                raise ConfigError(f"{where}: give [low, high] (got {args})")
            low, high = args
            if not low < high:
                exclusive = " (randint's high is exclusive: [a, b] draws a..b-1)"
                raise ConfigError(
                    f"{where}: low {low} must be below high {high}; write [low, high]"
                    + (exclusive if kind == "randint" else "")
                )
            if kind == "loguniform" and low <= 0:
                raise ConfigError(
                    f"{where}: low must be > 0 on a log scale (got {low}); use uniform to include 0"
                )
        elif not args:
            raise ConfigError(f"{where}: give at least one value")
        if search.algorithm == "optuna":
            if kind == "grid":
                raise ConfigError(
                    f"{where}: optuna does not take a grid; use choice, or search.algorithm: random"
                )
            if kind == "choice" and not all(
                v is None or isinstance(v, bool | int | float | str) for v in args
            ):
                raise ConfigError(
                    f"{where}: optuna chooses among plain values (numbers, strings, booleans); "
                    "use search.algorithm: random for lists or mappings"
                )
        for value in domain.candidates():
            check_value(base, path, kind, value)


def check_value(base: Config, path: str, kind: str, value: Any) -> None:
    """Validate the base config with `path` set to `value`, as a trial would."""
    try:
        got = flatten(as_dict(base.updated({path: value})))[path]
    except ConfigError as exc:
        message = str(exc)
        if message.startswith(f"{path}:"):
            raise ConfigError(f"space.{message}") from None
        raise ConfigError(f"space.{path}: with {value!r}, {message}") from None
    if isinstance(value, str) and not isinstance(got, str):
        raise ConfigError(
            f"space.{path}.{kind}: {value!r} is a string but {path} is a "
            f"{type(got).__name__}; write the value without quotes"
        )
    if kind in ("uniform", "loguniform") and isinstance(got, int) and not isinstance(got, bool):
        raise ConfigError(
            f"space.{path}.{kind}: {path} is an integer; draw it with randint (or choice)"
        )


def max_rounds(base: Config, space: dict[str, Domain]) -> int:
    """The most evaluation rounds any trial runs (ASHA's max_t)."""
    fields = flatten(as_dict(base))
    options = [space[p].candidates() if p in space else [fields[p]] for p in ROUND_FIELDS]
    return max(
        eval_rounds(base.updated(dict(zip(ROUND_FIELDS, values, strict=True))))
        for values in itertools.product(*options)
    )


def load_saved(search_dir: Path) -> TuneSpec:
    """The spec a search was started with (its search.yaml)."""
    path = search_dir / SEARCH_FILE
    if not path.is_file():
        raise ConfigError(
            f"--resume {search_dir.name}: no search in {search_dir}; give the name of a search "
            "started from this directory (and --set train.output_dir=DIR, or --config "
            "TUNE_FILE, if it was started with another train.output_dir)"
        )
    return parse_tune(read_yaml(path), search_dir)
