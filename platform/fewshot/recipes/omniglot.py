"""`fewshot omniglot` (`make omniglot`): the headline model, end to end.

1. The merged Omniglot store from the two small background zips in `--data DIR`.
2. The members of omniglot_members.yaml, each the recipe omniglot.yaml with its own
   settings, then the `--set` overrides, each with an equal share of `--minutes` as its
   `train.minutes` (the training loop fits the run into it on the machine at hand,
   train/budget.py).
3. The members combined into one model (runs/omniglot: an ensemble, the mean of their
   log-probabilities), tested and registered (alias `challenger`).
4. That version promoted to models:/omniglot@champion through the gate, in the working
   directory's tracking store (or $MLFLOW_TRACKING_URI, or `--set tracking.uri=...`).

Every run goes through the run lifecycle (train/runner.py, pipeline.py). Interrupted, the
command picks up where it stopped: the store is kept, a member continues from its last
checkpoint, and a member trained, a model combined, registered or promoted is not redone;
a second run does nothing.

The two YAML files are package data beside this module, not files under the
repository's jobs/configs/: they are part of the command, so it finds them from any
working directory, in a Ray job (which runs the package it ships) and from an installed
package alike, with no repository layout to assume.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from fewshot import pipeline
from fewshot.config import Config, apply_overrides, read_yaml, set_value, validate
from fewshot.data.sources import omniglot
from fewshot.errors import ConfigError, DataError, FewShotError
from fewshot.registry.gate import promote
from fewshot.registry.versions import CHAMPION, alias_version, connect
from fewshot.run_dir import RunDir
from fewshot.train import runner
from fewshot.train.budget import budget_minutes

RECIPE = Path(__file__).with_name("omniglot.yaml")
MEMBERS = Path(__file__).with_name("omniglot_members.yaml")
ZIPS = ("images_background_small1.zip", "images_background_small2.zip")

Say = Callable[[str], object]  # prints one line of progress (rich markup)


def member_configs(overrides: list[str], minutes: float) -> list[Config]:
    """The recipe with each member's settings and its share of `minutes`, then the
    overrides (which come last, so `--set` wins)."""
    members = yaml.safe_load(MEMBERS.read_text())["members"]
    configs = []
    for member in members:
        raw = read_yaml(RECIPE)
        share = {"train.minutes": minutes / len(members)}
        for key, value in {"name": member["name"], **member["set"], **share}.items():
            set_value(raw, key, value)
        configs.append(validate(apply_overrides(raw, overrides)))
    return configs


def source_zips(data: Path) -> list[Path]:
    zips = [data / name for name in ZIPS]
    missing = [z for z in zips if not z.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} does not exist; pass --data DIR, the folder that holds "
            f"{' and '.join(ZIPS)}"
        )
    return zips


def run(data: Path, minutes: str | float, overrides: list[str], say: Say) -> None:
    """Prepare, train, combine, register and promote (each step skipped when done).
    FewShotError when the gate does not promote the model."""
    # Everything the command line can get wrong is refused before anything is written.
    members = member_configs(overrides, budget_minutes(minutes, "--minutes"))
    first = members[0]
    if not first.tracking.enabled:
        raise ConfigError(
            "tracking.enabled: false, but fewshot omniglot registers and promotes its model "
            "in MLflow; drop --set tracking.enabled=false"
        )
    zips = source_zips(data)

    say(f"[bold]1/4[/] dataset: {', '.join(map(str, zips))} -> {first.data.path}")
    omniglot.prepare(zips, first.data.path)

    for member in members:
        member_dir = RunDir.of(member)
        if member_dir.finished():
            say(f"[bold]2/4[/] trained already: {member_dir.model}")
            continue
        resumed = " (resumes from its last checkpoint)" if member_dir.checkpoint.exists() else ""
        say(f"[bold]2/4[/] train {member.name}{resumed}")
        # runner's, not pipeline's: a member is not the model to register, though the
        # recipe's registry settings (the ensemble's) are in its config.
        runner.train(member, progress=True)

    name = first.registry.name or "omniglot"
    combined = RunDir(first.train.output_dir / name)
    if combined.finished():
        say(f"[bold]3/4[/] combined already: {combined.model}")
    else:
        say(f"[bold]3/4[/] combine {', '.join(m.name for m in members)} into {name}")
        sources = [str(RunDir.of(m).path) for m in members]
        pipeline.ensemble(sources, [f"name={name}", "registry.register=true"])
    config = validate(combined.saved_config())
    # Found, or registered now if a previous run stopped between combining and registering.
    version = pipeline.registered(combined.run_id(), config)

    if alias_version(connect(config.tracking.uri), name, CHAMPION) == version:
        say(f"[bold]4/4[/] models:/{name}@{CHAMPION} is this run's model already")
        return
    say(f"[bold]4/4[/] promote {name} version {version}")
    decision = promote(name, version, uri=config.tracking.uri)
    say(decision.summary())
    if not decision.promoted:
        raise FewShotError(f"{name} version {version} was not promoted; see the gate above")
