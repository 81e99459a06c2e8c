"""`make omniglot`, or `ray job submit --working-dir . -- python jobs/omniglot.py`:
the headline model. Prepares Omniglot's two small background sets, trains the recipe
(jobs/configs/omniglot.yaml) on both, registers it and promotes it to
models:/omniglot@champion in the working directory's tracking store (or
$MLFLOW_TRACKING_URI).

Interrupted, it picks up where it stopped: the store is kept, training continues from
its last checkpoint, and a model already trained, registered or promoted is not redone.

OMNIGLOT_DIR: the folder with images_background_small{1,2}.zip (default:
../shared/datasets/omniglot). Extra arguments are overrides: `train.steps=2000`.

OMNIGLOT_TRAIN_MINUTES (default 40): the training budget. The job times a few steps
first, and on a machine too slow for the recipe's steps in that time it trains fewer,
with the schedule scaled to match (fewshot/train/budget.py), so the whole job stays
under an hour on any CPU. The decision is kept in the run's config, so a resumed run
trains to the same step count.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from rich.console import Console  # noqa: E402

from fewshot.config import Config, load_config  # noqa: E402
from fewshot.data.sources import omniglot  # noqa: E402
from fewshot.errors import DataError, FewShotError  # noqa: E402
from fewshot.registry.gate import promote  # noqa: E402
from fewshot.registry.versions import CHAMPION, alias_version, connect, register  # noqa: E402
from fewshot.run_dir import RunDir  # noqa: E402
from fewshot.train.budget import fit_to_budget, scaled_to  # noqa: E402
from fewshot.train.runner import train  # noqa: E402

CONFIG = Path(__file__).parent / "configs" / "omniglot.yaml"


def within_budget(config: Config, run_dir: RunDir, console: Console) -> Config:
    """The config to train: scaled to OMNIGLOT_TRAIN_MINUTES on this machine, or, for a
    run started before, to the step count it started with."""
    saved = run_dir.saved_config()
    if saved is not None:  # decided when the run started; a resumed run keeps it
        steps = saved.get("train", {}).get("steps", config.train.steps)
        return config if steps == config.train.steps else scaled_to(config, steps)
    minutes = float(os.environ.get("OMNIGLOT_TRAIN_MINUTES", "40"))
    budget = fit_to_budget(config, minutes)
    console.print(budget.summary(), highlight=False)
    return budget.config


def main(overrides: list[str]) -> None:
    console = Console(stderr=True)
    config = load_config(CONFIG, overrides)
    name = config.registry.name or config.name
    source = Path(os.environ.get("OMNIGLOT_DIR", "../shared/datasets/omniglot"))
    zips = [source / f"images_background_small{i}.zip" for i in (1, 2)]
    missing = [z for z in zips if not z.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} does not exist; set OMNIGLOT_DIR to the folder that holds "
            "images_background_small1.zip and images_background_small2.zip"
        )
    console.print(f"[bold]1/3[/] dataset: {', '.join(map(str, zips))} -> {config.data.path}")
    omniglot.prepare(zips, config.data.path)

    run_dir = RunDir.of(config)
    if run_dir.finished():
        console.print(f"[bold]2/3[/] trained already: {run_dir.model}")
    else:
        console.print(f"[bold]2/3[/] train {config.name} (resumes from its last checkpoint)")
        config = within_budget(config, run_dir, console)
        train(config, progress=True)  # a bar on a terminal, else a line every 5%

    client = connect(config.tracking.uri)
    run_id = run_dir.run_id()
    versions = client.search_model_versions(f"name='{name}'")
    mine = [str(v.version) for v in versions if v.run_id == run_id]
    if not mine:  # stopped between training and registration
        mine = [str(register(run_id, name, uri=config.tracking.uri).version)]
    if alias_version(client, name, CHAMPION) in mine:
        console.print(f"[bold]3/3[/] models:/{name}@{CHAMPION} is this run's model already")
        return
    version = max(mine, key=int)
    console.print(f"[bold]3/3[/] promote {name} version {version}")
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
