"""`make omniglot`, or `ray job submit --working-dir . -- python jobs/omniglot.py`:
the headline model. Prepares Omniglot's two small background sets, trains the members
of jobs/configs/train/omniglot_members.yaml (the recipe jobs/configs/train/omniglot.yaml, each with
its own settings) on both, combines them into one model (runs/omniglot: an ensemble,
the mean of their log-probabilities), registers it and promotes it to
models:/omniglot@champion in the working directory's tracking store (or
$MLFLOW_TRACKING_URI).

Interrupted, it picks up where it stopped: the store is kept, a member's training
continues from its last checkpoint, and a member trained, or a model combined,
registered or promoted, is not redone.

OMNIGLOT_DIR: the folder with images_background_small{1,2}.zip (default:
../shared/datasets/omniglot). Extra arguments are overrides for every member, applied
after the member's own settings: `train.steps=2000`.

OMNIGLOT_TRAIN_MINUTES (default 40): the training budget, shared equally by the
members; anything but a number of minutes above 0 is refused before anything runs.
The job times a few steps of each member first, and on a machine too slow for its
steps in its share it trains fewer, with the schedule scaled to match
(fewshot/train/budget.py), so the whole job stays under an hour on any CPU. The
decision is kept in the member's run config, so a resumed run trains to the same step
count.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

from fewshot.config import Config, apply_overrides, read_yaml, set_value, validate  # noqa: E402
from fewshot.data.sources import omniglot  # noqa: E402
from fewshot.errors import DataError, FewShotError  # noqa: E402
from fewshot.registry.gate import promote  # noqa: E402
from fewshot.registry.versions import CHAMPION, alias_version, connect, register  # noqa: E402
from fewshot.run_dir import RunDir  # noqa: E402
from fewshot.train.budget import budget_minutes, fit_to_budget, scaled_to  # noqa: E402
from fewshot.train.runner import combine, ensemble_model, train  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "train" / "omniglot.yaml"
MEMBERS = Path(__file__).parent / "configs" / "train" / "omniglot_members.yaml"


def member_configs(overrides: list[str]) -> list[Config]:
    """The recipe with each member's settings, then the command line's overrides."""
    configs = []
    for member in yaml.safe_load(MEMBERS.read_text())["members"]:
        raw = read_yaml(CONFIG)
        for key, value in {"name": member["name"], **member["set"]}.items():
            set_value(raw, key, value)
        configs.append(validate(apply_overrides(raw, overrides)))
    return configs


def within_budget(config: Config, run_dir: RunDir, minutes: float, console: Console) -> Config:
    """The config to train: scaled to `minutes` on this machine, or, for a run started
    before, to the step count it started with."""
    saved = run_dir.saved_config()
    if saved is not None:  # decided when the run started; a resumed run keeps it
        steps = saved.get("train", {}).get("steps", config.train.steps)
        return config if steps == config.train.steps else scaled_to(config, steps)
    budget = fit_to_budget(config, minutes)
    console.print(budget.summary(), highlight=False)
    return budget.config


def main(overrides: list[str]) -> None:
    console = Console(stderr=True)
    budget = os.environ.get("OMNIGLOT_TRAIN_MINUTES", "40")
    minutes = budget_minutes(budget, "OMNIGLOT_TRAIN_MINUTES")  # before any step runs
    members = member_configs(overrides)
    share = minutes / len(members)
    name = members[0].registry.name or "omniglot"
    source = Path(os.environ.get("OMNIGLOT_DIR", "../shared/datasets/omniglot"))
    zips = [source / f"images_background_small{i}.zip" for i in (1, 2)]
    missing = [z for z in zips if not z.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} does not exist; set OMNIGLOT_DIR to the folder that holds "
            "images_background_small1.zip and images_background_small2.zip"
        )
    console.print(f"[bold]1/4[/] dataset: {', '.join(map(str, zips))} -> {members[0].data.path}")
    omniglot.prepare(zips, members[0].data.path)

    for member in members:
        member_dir = RunDir.of(member)
        if member_dir.finished():
            console.print(f"[bold]2/4[/] trained already: {member_dir.model}")
            continue
        console.print(f"[bold]2/4[/] train {member.name} (resumes from its last checkpoint)")
        train(within_budget(member, member_dir, share, console), progress=True)

    sources = [str(RunDir.of(m).path) for m in members]
    run_dir = RunDir(members[0].train.output_dir / name)
    if run_dir.finished():
        console.print(f"[bold]3/4[/] combined already: {run_dir.model}")
        config = validate(run_dir.saved_config())
    else:
        console.print(f"[bold]3/4[/] combine {', '.join(m.name for m in members)} into {name}")
        config, model = ensemble_model(sources, [f"name={name}"])
        combine(config, model, sources)

    client = connect(config.tracking.uri)
    run_id = run_dir.run_id()
    versions = client.search_model_versions(f"name='{name}'")
    mine = [str(v.version) for v in versions if v.run_id == run_id]
    if not mine:  # stopped between training and registration
        mine = [str(register(run_id, name, uri=config.tracking.uri).version)]
    if alias_version(client, name, CHAMPION) in mine:
        console.print(f"[bold]4/4[/] models:/{name}@{CHAMPION} is this run's model already")
        return
    version = max(mine, key=int)
    console.print(f"[bold]4/4[/] promote {name} version {version}")
    decision = promote(name, version, uri=config.tracking.uri)
    console.print(decision.summary(), highlight=False)
    if not decision.promoted:
        raise FewShotError(f"{name} version {version} was not promoted; see the gate above")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
