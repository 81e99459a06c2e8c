"""Every setting of a run, as one pydantic tree read from YAML.

`load_config(path, overrides)` reads a YAML file, applies `--set a.b=value`
overrides and validates the result. A wrong key or value raises a `ConfigError`
whose one line starts with the dotted path (`episode.n_way: must be >= 2`).
`resolved_yaml(config)` writes the full tree back, defaults included, which is
what every run logs.

Method settings live under `method:` next to `name:`; each method declares its
own pydantic model (`Params`), so adding a method never touches this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from fewshot.errors import ConfigError, FewShotError
from fewshot.methods import MethodParams, method_class
from fewshot.models.views import VIEW_SHIFTS

# The one rule for the names of runs, searches and registered models. `.` or `..` would
# make output_dir/NAME the output directory or its parent, which --restart deletes, and
# MLflow refuses them as model names (after the whole training run); a long name fails
# deep inside the file system or MLflow.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
NAME_RULE = "use 1 to 100 letters, digits, _, - and ., not starting with ."


def _name(purpose: str) -> AfterValidator:
    """A validator of RUN_NAME whose message says what the name is for."""

    def check(value: str) -> str:
        if not RUN_NAME.fullmatch(value):
            raise PydanticCustomError("name", f"{NAME_RULE} ({purpose})")
        return value

    return AfterValidator(check)


# The name of a run or a search: a directory under train.output_dir, and Ray's.
RunName = Annotated[str, _name("it names the run's directory")]
ModelName = Annotated[str, _name("it names the model in models:/NAME@alias")]
MINUTES_RULE = "give the training budget as a number of minutes above 0, e.g. 40"


def parse_minutes(value: Any) -> float | None:
    """`value`, a number or its text (an environment variable's), as a training budget in
    minutes: a finite number above 0; None when it is not one (`abc`, empty, `nan`, `-5`,
    `true`), which callers refuse in one line (MINUTES_RULE) rather than turn into a
    budget of 0 or of forever."""
    if isinstance(value, bool):
        return None
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        return None
    return minutes if math.isfinite(minutes) and minutes > 0 else None


# numpy's SeedSequence takes no negative seed, and a seed above 2**32 - 1 says nothing
# more: one range for every seed, refused at validation rather than deep in training.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class Section(BaseModel):
    """A config section: unknown keys are errors, not silently ignored, and no number is
    inf or nan (`train.lr=inf` would train a model of NaNs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    path: Path = Path("data/synthetic")
    train_split: list[str] = ["train"]
    val_split: str | None = "val"
    test_split: str = "test"
    image_size: int = Field(28, ge=8, le=512)
    within_group: bool = False  # all classes of an episode from one group (alphabet)
    # Train on only this many base classes (drawn with `seed`), or on the classes named
    # in a list: DATG's few-base-class setting (miniImageNet-S: 12). The chosen names are
    # logged with the run (train_classes.json). None: all classes of train_split.
    train_classes: int | list[str] | None = None
    # Hold out this many groups (alphabets, scripts) of train_split, drawn with `seed`,
    # as the validation classes: for stores without a validation split (Omniglot's
    # small1/small2). Needs val_split: null. train_classes then draws from the rest.
    val_groups: int | None = Field(None, ge=1)
    # How training images are held (once per node under Ray, shared by its workers):
    # memory: decoded up front into one uint8 array; episode: kept encoded (PNG/JPEG
    # bytes) and each episode's images decoded when it is sampled, by a small thread
    # pool; auto: memory when the decoded train and validation images fit in
    # memory_budget_gb, else episode. Episodes are identical either way.
    decode: Literal["auto", "memory", "episode"] = "auto"
    # None: half the memory available when the data is loaded, and under Ray at most
    # 80% of the smallest node's object store (where the decoded copy must fit).
    memory_budget_gb: float | None = Field(None, gt=0)

    @field_validator("train_classes")
    @classmethod
    def _at_least_two(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 2:
            raise PydanticCustomError("too_few", "must be >= 2")
        if isinstance(value, list) and (len(value) < 2 or len(set(value)) < len(value)):
            raise PydanticCustomError("too_few", "name at least 2 classes, each once")
        return value

    @field_validator("train_split", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EpisodeConfig(Section):
    n_way: int = Field(5, ge=2)
    k_shot: int = Field(1, ge=1)
    q_query: int = Field(15, ge=1)
    meta_batch: int = Field(4, ge=1)  # tasks per optimiser step, over all workers


class BackboneConfig(Section):
    name: Literal["conv4", "conv4_nopool", "resnet12", "wrn28_10"] = "conv4"
    width: int | None = Field(None, ge=1)  # channels of the first stage; None: the usual


class MethodConfig(BaseModel):
    """`name` picks the method; the other keys are that method's `Params`.

    `validate` parses those keys once into `settings`, the typed object the method is
    checked and built with, and fills in their defaults; the keys themselves stay the
    section's (plain) contents, so YAML, `--set` and dumps see them as before."""

    model_config = ConfigDict(extra="allow")
    name: str = "protonet"
    # Not a field: a dump holds the keys, not a nested object.
    _settings: MethodParams | None = PrivateAttr(None)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def settings(self) -> MethodParams:
        if self._settings is None:
            raise RuntimeError("method settings are parsed by fewshot.config.validate")
        return self._settings

    @classmethod
    def parsed(cls, name: str, settings: MethodParams) -> MethodConfig:
        """The section of method `name` with its parsed `settings`."""
        section = cls(name=name, **settings.model_dump(mode="json"))
        section._settings = settings
        return section


class PretrainConfig(Section):
    """Whole-class pre-training of the backbone before meta-training (train/pretrain.py):
    CFN and MTL need it; any method may use it. Adam, cross-entropy over all base classes."""

    steps: int = Field(0, ge=0)  # 0: no pre-training
    batch_size: int = Field(64, ge=2)  # images per step, over all workers
    lr: float = Field(1e-3, gt=0)


class DistillConfig(Section):
    """Distillation (train/distill.py): meta-train towards a trained teacher's answers on
    each training episode as well as towards its labels."""

    # Run directories, model files or MLflow run ids; several: their ensemble. []: none.
    teachers: list[str] = []
    weight: float = Field(0.5, ge=0, le=1)  # of the teacher's term; 1 - weight: the labels'
    temperature: float = Field(4.0, gt=0)  # softens the teacher's and the student's answers
    # The teacher's test views while it teaches (models/views.py): each costs a forward pass.
    teacher_views: int = Field(1, ge=1, le=len(VIEW_SHIFTS))


class TaskMixupConfig(Section):
    """Task mixup (augment/task_mixup.py) for methods that support it (protonet, maml).

    strategy: none (vanilla), mlti (random task pairs), cluster (pairs from different
    clusters of base classes, no MMD), datg (cluster pairs plus the MMD term)."""

    strategy: Literal["none", "mlti", "cluster", "datg"] = "none"
    alpha: float = Field(2.0, gt=0)  # lambda ~ Beta(alpha, beta)
    beta: float = Field(2.0, gt=0)
    mmd_weight: float = Field(1.0, ge=0)  # datg only
    clusters: int = Field(2, ge=2)  # k of k-means over base classes (cluster, datg)
    recluster_every: int | None = Field(None, ge=1)  # None: cluster once, on pixels
    probability: float = Field(1.0, ge=0, le=1)  # share of tasks replaced by mixed ones


class AugmentConfig(Section):
    """Augmentation of the training images (augment/images.py); validation and test
    episodes are never augmented. Jitter bounds are +- ranges, drawn per image."""

    rotations: bool = False  # 90/180/270-degree rotations of each base class as new classes
    degrees: float = Field(0.0, ge=0, le=180)  # rotation
    scale: float = Field(0.0, ge=0, lt=1)  # isotropic scale 1 +- scale
    shear: float = Field(0.0, ge=0, le=1)
    translate: float = Field(0.0, ge=0, le=0.5)  # shift, fraction of the image side
    # Stroke width: each image blended towards its 3x3 dilation (thicker ink) or erosion
    # (thinner) by a weight drawn in +- stroke; for ink-high images (Omniglot).
    stroke: float = Field(0.0, ge=0, le=1)


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "step", "multistep", "cosine"] = "step"
    step_every: int = Field(500, ge=1)  # "step" schedule: multiply lr by gamma this often
    # "multistep" schedule: multiply lr by gamma at each of these steps (a paper's
    # "x0.1 after epoch 60, then every 10" in steps).
    milestones: list[int] = []
    gamma: float = Field(0.5, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(250, ge=1)  # validation round and checkpoint
    val_episodes: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How a step computes, chosen for the hardware (runtime.py). precision "auto": bf16
    # autocast where the device has native bf16 (AMX or AVX512-BF16 CPUs, GPUs from
    # Ampere on), fp32 elsewhere; channels_last "auto": NHWC or NCHW, whichever a few
    # timed steps of the run's own episode find faster (cached per machine and shape).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    # bf16 on a CPU without native bf16 is 7-8x slower than fp32 and refused unless this
    # says it is meant (tests of that path).
    allow_slow_precision: bool = False
    # torch intra-op threads; None: the CPUs this process is given (a Ray worker's share).
    # More than the CPUs it may run on is refused where the run starts (runtime.py).
    threads: int | None = Field(None, ge=1)
    # A wall-clock budget (train/budget.py): the run trains at most `steps`, fewer when
    # they would not fit in these minutes at the speed it measures as it goes, with the
    # schedule scaled to the steps it will train. None: no budget, `steps` steps.
    minutes: float | None = None
    output_dir: Path = Path("runs")

    @field_validator("minutes", mode="before")
    @classmethod
    def _a_budget(cls, value: Any) -> Any:
        if value is not None and parse_minutes(value) is None:
            raise PydanticCustomError("minutes", MINUTES_RULE)
        return value


class EvaluateConfig(Section):
    """Fixed test episodes. Unset shape fields take the training episode's."""

    episodes: int = Field(600, ge=1)
    n_way: int | None = Field(None, ge=2)
    k_shot: int | None = Field(None, ge=1)
    q_query: int | None = Field(None, ge=1)
    within_group: bool | None = None
    seed: Seed = 0  # separate from the run's seed so every method sees the same episodes
    # Transductive inference: classify an episode's queries together, each prototype
    # refined with the queries it likely holds (ProtoNet, `predict_transductive`). Off by
    # default and never a headline figure: people and the published anchors classify
    # each test drawing on its own.
    transductive: bool = False


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "fewshot"


with warnings.catch_warnings():
    # `register` shadows ABCMeta.register, which no one calls on a config; pydantic warns.
    warnings.filterwarnings("ignore", 'Field name "register"', UserWarning)

    class RegistryConfig(Section):
        """The model registry: registration after training, and the promotion gate."""

        register: bool = False  # register the trained model (alias `challenger`) after training
        name: ModelName | None = None  # registered; None: the run's name
        # The gate promotes a challenger only if its accuracy beats the champion's by more
        # than `margin` (absolute, 0.01 = one point) at this one-sided confidence.
        margin: float = Field(0.0, ge=0, lt=1)
        confidence: float = Field(0.95, ge=0.5, lt=1)


class DistributedConfig(Section):
    """Ray Train. `workers: 0` trains in this process without Ray; `workers: [min, max]`
    is elastic: Ray Train starts as many as the cluster holds, at least `min`, and after
    a node is lost (with `max_failures` left) goes on from the last checkpoint with the
    workers that remain. The optimiser steps do not change with the worker count."""

    workers: int | tuple[int, int] = 0
    # How Ray places the workers: `pack` fills a node first (less traffic), `spread`
    # puts them on different nodes (a lost node takes fewer workers with it).
    placement: Literal["pack", "spread"] = "pack"
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # used when use_gpu
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the last checkpoint
    keep_checkpoints: int = Field(2, ge=1)  # the latest N that Ray keeps in storage_path
    # Where Ray keeps checkpoints: None is train.output_dir/ray on this node; a
    # multi-node cluster needs storage every node sees (s3://, gs://, a shared mount).
    storage_path: str | None = None
    address: str | None = None  # None: $RAY_ADDRESS, else start a local Ray

    @field_validator("workers")
    @classmethod
    def _count_or_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, int) and value < 0:
            raise PydanticCustomError("workers", "must be >= 0 (0 trains without Ray)")
        if isinstance(value, tuple) and not 1 <= value[0] <= value[1]:
            raise PydanticCustomError("workers", "[min, max] needs 1 <= min <= max, e.g. [1, 4]")
        return value

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers


class Config(Section):
    name: RunName = "run"
    seed: Seed = 0
    data: DataConfig = DataConfig()
    episode: EpisodeConfig = EpisodeConfig()
    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()
    pretrain: PretrainConfig = PretrainConfig()
    task_mixup: TaskMixupConfig = TaskMixupConfig()
    distill: DistillConfig = DistillConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    registry: RegistryConfig = RegistryConfig()

    def updated(self, changes: Mapping[str, Any]) -> Config:
        """This config with `changes` (dotted path -> value, e.g. {"train.steps": 7500})
        applied and the result validated once, as a file with those values would be."""
        raw = as_dict(self)
        for path, value in changes.items():
            set_value(raw, path, value)
        return validate(raw)

    def eval_episode(self) -> EpisodeConfig:
        """The shape of test episodes: `evaluate.*` where set, else `episode.*`."""
        e = self.evaluate
        return EpisodeConfig(
            n_way=e.n_way or self.episode.n_way,
            k_shot=e.k_shot or self.episode.k_shot,
            q_query=e.q_query or self.episode.q_query,
            meta_batch=1,
        )

    def eval_within_group(self) -> bool:
        w = self.evaluate.within_group
        return self.data.within_group if w is None else w


def _describe(error: dict[str, Any]) -> str:
    """pydantic's error as a short phrase ("must be >= 2")."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; `fewshot train --help` lists sections)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return error["msg"][0].lower() + error["msg"][1:]


def _quote(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _raise(exc: ValidationError, prefix: str = "") -> None:
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {_quote(value)})"
    raise ConfigError(f"{prefix}{path}: {_describe(first)}{shown}") from None


def _check_gpu(config: Config) -> None:
    """`distributed.use_gpu` gives each Ray worker a GPU; `train.device` must agree."""
    d, device = config.distributed, config.train.device
    if d.use_gpu and d.gpus_per_worker == 0:
        raise ConfigError(
            "distributed.gpus_per_worker: 0 with use_gpu: true; give workers a GPU share "
            "(e.g. 1, or 0.5 to put two workers on one GPU) or set use_gpu: false"
        )
    if d.use_gpu and device == "cpu":
        raise ConfigError(
            "train.device: cpu with distributed.use_gpu: true; use train.device=auto or cuda"
        )
    if d.workers and not d.use_gpu and device == "cuda":
        raise ConfigError(
            "train.device: cuda but Ray workers get no GPU; set distributed.use_gpu: true"
        )


def validate(raw: dict[str, Any]) -> Config:
    """A validated Config from a plain dict, with the method's own settings checked."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        _raise(exc)
    if config.distributed.max_workers > config.episode.meta_batch:
        raise ConfigError(
            f"episode.meta_batch: {config.episode.meta_batch} tasks cannot be shared by "
            f"distributed.workers = {config.distributed.max_workers}; raise meta_batch to at "
            "least the (largest) number of workers"
        )
    _check_gpu(config)
    if config.train.schedule == "multistep" and not config.train.milestones:
        raise ConfigError(
            "train.milestones: the multistep schedule needs the steps at which to decay the "
            "learning rate, e.g. --set 'train.milestones=[9000, 10500]'"
        )
    if config.data.val_groups and config.data.val_split:
        raise ConfigError(
            f"data.val_groups: holds validation classes out of the train split, but "
            f"data.val_split = {config.data.val_split!r} already names a validation split; "
            "set data.val_split: null (or unset data.val_groups)"
        )
    if config.distill.teachers and config.task_mixup.strategy != "none":
        raise ConfigError(
            f"distill.teachers: task mixup ({config.task_mixup.strategy}) trains on mixed "
            "hidden representations, which no teacher can answer; set task_mixup.strategy="
            "none or distill.teachers=[]"
        )
    cls = method_class(config.method.name)
    try:
        settings = cls.Params.model_validate(config.method.params())
    except ValidationError as exc:
        _raise(exc, prefix="method.")
    config.method = MethodConfig.parsed(config.method.name, settings)
    cls.check(config, settings)
    return config


def set_value(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a raw config tree, creating sections on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` strings (`--set`) as {dotted path: value}; values are parsed as YAML
    (`3`, `true`, `[a, b]`), and a later string for the same path wins."""
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=500")
        changes.pop(key.strip(), None)  # keeps the order in which they apply
        changes[key.strip()] = yaml.safe_load(text)
    return changes


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (`parse_overrides`) to a raw config tree, as read from YAML."""
    for path, value in parse_overrides(overrides).items():
        set_value(raw, path, value)
    return raw


def limits_from_env(
    cls: type, variable: Callable[[str], str], error: type[FewShotError], env=None
) -> Any:
    """The dataclass `cls` of whole-number limits with each field whose environment
    variable (`variable(field)`) is set taken from it: a whole number >= 1, else `error`
    in one line. The servers' and the galleries' limits are set so."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(cls):
        text = env.get(variable(f.name))
        if text is None:
            continue
        if not text.isdigit() or int(text) < 1:
            raise error(f"{variable(f.name)}={text!r}: give a whole number >= 1")
        values[f.name] = int(text)
    return cls(**values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (ConfigError naming the file otherwise)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass --config PATH to a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH to a YAML")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from the defaults), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(raw, overrides or []))


def as_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def resolved_yaml(config: Config) -> str:
    return yaml.safe_dump(as_dict(config), sort_keys=False)


def config_hash(config: Config) -> str:
    """A short hash of the resolved config (what decides the result), for tags."""
    return hashlib.sha256(json.dumps(as_dict(config), sort_keys=True).encode()).hexdigest()[:12]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
