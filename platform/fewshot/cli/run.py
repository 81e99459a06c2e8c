"""The top-level commands that train a model or use one: train, evaluate, demo (the main
job end to end), omniglot (the headline model end to end) and predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fewshot.cli.common import (
    ConfigOpt,
    SetOpt,
    accuracy_table,
    console,
    print_prepared,
    print_where,
)


def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    restart: Annotated[bool, typer.Option(help="Discard a previous run of the same name.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Resolve and print the config, then stop.")] = False,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to train on (sets distributed.address; default $RAY_ADDRESS)."
        ),
    ] = None,
) -> None:
    """Meta-train a method, evaluate it on fixed test episodes, log it to MLflow.

    A run whose directory (runs/NAME) holds an unfinished checkpoint continues from it.
    """
    from fewshot.config import load_config, resolved_yaml

    cfg = load_config(
        config, [*(set_ or []), *([f"distributed.address={address}"] if address else [])]
    )
    if dry_run:
        console.print(resolved_yaml(cfg), highlight=False)
        return
    from fewshot.evaluate import evaluation_row
    from fewshot.pipeline import train

    # Progress shows as a bar on a terminal and as plain lines in a log (ray job logs, CI).
    result = train(cfg, restart=restart, progress=True)
    console.print(accuracy_table([evaluation_row(cfg, result.test)], f"run {cfg.name}"))
    print_where(result.run_dir, result.run_id, cfg.tracking.uri)
    print_registered(cfg)


def ensemble(
    members: Annotated[
        list[str],
        typer.Argument(
            help="Trained models, 2 or more: runs/NAME, model .pt files or MLflow run ids "
            "(resolved against $MLFLOW_TRACKING_URI)."
        ),
    ],
    name: Annotated[str, typer.Option(help="The ensemble run's name (runs/NAME).")],
    set_: SetOpt = None,
    restart: Annotated[bool, typer.Option(help="Discard a previous run of the same name.")] = False,
) -> None:
    """Combine trained models into one (the mean of their log-probabilities), test it on
    the first member's fixed test episodes and log it as a run of its own, which
    `fewshot register` registers like a trained run (or --set registry.register=true;
    the members' own registry settings do not carry over)."""
    from fewshot.evaluate import evaluation_row
    from fewshot.pipeline import ensemble as combine

    result = combine(members, [f"name={name}", *(set_ or [])], restart=restart)
    cfg = result.config
    row = {**evaluation_row(cfg, result.test), "method": f"ensemble of {len(members)}"}
    console.print(accuracy_table([row], f"run {name}"))
    print_where(result.run_dir, result.run_id, cfg.tracking.uri)
    print_registered(cfg)


def print_registered(cfg) -> None:
    if cfg.registry.register:
        name = cfg.registry.name or cfg.name
        console.print(f"registered as {name} (@challenger); gate it with: fewshot promote {name}")


def evaluate(
    run: Annotated[str, typer.Option(help="runs/NAME, a model .pt file or an MLflow run id.")],
    episodes: Annotated[int, typer.Option(help="Number of fixed test episodes.")] = 600,
    split: Annotated[
        str | None, typer.Option(help="Split to test on (default: the run's).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Accuracy with a 95% CI on fixed test episodes (the same for every method)."""
    from fewshot.evaluate import evaluate_method, evaluation_row
    from fewshot.model_file import from_run, with_settings

    config, method = from_run(run)
    if set_:
        config, method = with_settings(config, method, set_)
    accuracy = evaluate_method(method, config, episodes, split)
    if split:
        config.data.test_split = split
    console.print(accuracy_table([evaluation_row(config, accuracy)], f"evaluate {run}"))


# Brief training: a couple of minutes on a 2-core laptop, far above chance.
DEMO_SETTINGS = [
    "name=demo",
    "train.steps=500",
    "episode.meta_batch=2",
    # 5 queries per class while training (15 in the test episodes): 2.5x less compute per
    # step at the same accuracy, so the demo stays near a minute on an AVX2-only CPU.
    "episode.q_query=5",
    "evaluate.q_query=15",
    "train.eval_every=250",
    "train.step_every=250",
]


def demo(
    workdir: Annotated[Path, typer.Option(help="Where data and runs go.")] = Path("."),
) -> None:
    """The main job end to end on embedded defaults: synthetic glyphs, ProtoNet conv4,
    5-way 1-shot, evaluated on 600 fixed episodes of unseen scripts."""
    from fewshot.config import load_config
    from fewshot.data.sources import synthetic
    from fewshot.evaluate import evaluation_row
    from fewshot.train.runner import train

    data = workdir / "data" / "synthetic"
    console.print(f"[bold]1/3[/] dataset: synthetic glyphs -> {data}")
    print_prepared(synthetic.prepare(data), data)
    cfg = load_config(
        None, [f"data.path={data}", f"train.output_dir={workdir / 'runs'}", *DEMO_SETTINGS]
    )
    console.print(
        f"[bold]2/3[/] train: {cfg.method.name} {cfg.backbone.name}, "
        f"{cfg.episode.n_way}-way {cfg.episode.k_shot}-shot, {cfg.train.steps} steps"
    )
    result = train(cfg, restart=True, progress=True)
    console.print("[bold]3/3[/] evaluation on test scripts never seen in training")
    console.print(accuracy_table([evaluation_row(cfg, result.test)], "demo"))
    console.print(f"chance is {100 / cfg.episode.n_way:.0f}%")
    print_where(result.run_dir, result.run_id, cfg.tracking.uri)


def omniglot(
    data: Annotated[
        Path,
        typer.Option(
            help="Folder with images_background_small1.zip and images_background_small2.zip."
        ),
    ] = Path("../shared/datasets/omniglot"),
    # Text, not a float: `abc` or `nan` get the one-line budget rule, not a usage error.
    minutes: Annotated[
        str, typer.Option(help="Training budget in minutes, shared equally by the members.")
    ] = "40",
    set_: SetOpt = None,
) -> None:
    """What `make omniglot` runs: the headline model. Prepares the two small background
    sets, trains the recipe's two members within the budget, combines them into one
    model, registers it and promotes it to models:/omniglot@champion. Interrupted, it
    resumes; run again, it does nothing."""
    from rich.console import Console

    from fewshot.recipes import omniglot as recipe

    # Progress on stderr, as the training runs' own lines.
    err = Console(stderr=True)
    recipe.run(data, minutes, set_ or [], lambda line: err.print(line, highlight=False))


def predict(
    model: Annotated[
        str, typer.Option(help="MLflow model URI: models:/NAME@champion, runs:/ID/fewshot, a path.")
    ],
    query: Annotated[Path, typer.Option(help="Folder of images to classify.")],
    support: Annotated[
        Path | None, typer.Option(help="One sub-folder of images per class (its label).")
    ] = None,
    gallery: Annotated[
        str | None, typer.Option(help="Instead of --support: a gallery's latest version.")
    ] = None,
) -> None:
    """Classify the query images among the classes of the support folder, or of a gallery
    (`fewshot gallery`); one JSON line per query file, in file-name order: {"file", "label",
    "probabilities"}, and with --gallery the "model_version" and "gallery_version" used."""
    from fewshot.errors import RequestError
    from fewshot.registry import galleries
    from fewshot.registry.versions import connect, load
    from fewshot.serve.folders import read_query, read_support

    if (support is None) == (gallery is None):
        raise RequestError("give the classes with either --support DIR or --gallery NAME")
    used = {}
    if support is not None:
        images, labels = read_support(support)  # refuse bad folders before loading the model
    names, queries = read_query(query)
    if gallery is not None:
        version = galleries.get(gallery)
        images, labels = galleries.support(version)
        model, model_version = galleries.pinned(model)
        used = {"model_version": model_version, "gallery_version": version.version}
    if model.startswith(("models:/", "runs:/")):
        connect()  # these resolve through the tracking store: refuse a missing one
    answers = load(model).classify(images, labels, queries)
    for file, answer in zip(names, answers, strict=True):
        print(json.dumps({"file": file, **answer, **used}))
