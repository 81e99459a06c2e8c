"""The `fewshot` command line. Every user error prints one line and exits 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fewshot.errors import FewShotError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Distributed few-shot meta-training, tracked and served with MLflow.",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect datasets.")
prepare_app = typer.Typer(no_args_is_help=True, help="Convert a source into a dataset store.")
app.add_typer(data_app, name="data")
data_app.add_typer(prepare_app, name="prepare")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: --set train.steps=500 (repeatable)."),
]


def _manifest_table(manifest: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("split", "classes", "images", "groups", "min images/class"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for name, split in manifest["splits"].items():
        table.add_row(
            name,
            str(split["classes"]),
            str(split["images"]),
            str(split["groups"]),
            str(split["min_images_per_class"]),
        )
    return table


def _print_prepared(manifest: dict, out: Path) -> None:
    console.print(_manifest_table(manifest, f"{manifest['name']} -> {out}"))


@prepare_app.command("omniglot")
def prepare_omniglot(
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    from_zip: Annotated[
        list[Path] | None,
        typer.Option(
            help="An official Omniglot zip, e.g. images_background_small1.zip (repeatable)."
        ),
    ] = None,
    download: Annotated[
        bool, typer.Option(help="Download background and evaluation zips first (needs internet).")
    ] = False,
    partial: Annotated[bool, typer.Option(help="Accept a copy with missing characters.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a store from another source.")] = False,
) -> None:
    """Omniglot: one split per zip (small1, small2, background, evaluation); groups are
    alphabets."""
    from fewshot.data.sources import omniglot

    zips = list(from_zip or [])
    if download:
        zips += omniglot.download(out.parent / "omniglot-zips", ["background", "evaluation"])
    _print_prepared(omniglot.prepare(zips, out, partial=partial, overwrite=overwrite), out)


@prepare_app.command("folder")
def prepare_folder(
    root: Annotated[Path, typer.Option(help="ROOT/class/image (or ROOT/group/class/image).")],
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    ratios: Annotated[
        str, typer.Option(help="Class fractions for train,val,test.")
    ] = "0.64,0.16,0.2",
    split_by_group: Annotated[
        bool, typer.Option(help="Tree is ROOT/group/class/image; whole groups go to one split.")
    ] = False,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the class-to-split shuffle.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a store from another source.")] = False,
) -> None:
    """Any folder tree of class folders, cut into disjoint train/val/test classes."""
    from fewshot.data.sources import folder
    from fewshot.errors import DataError

    try:
        parts = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        raise DataError(
            f"--ratios {ratios!r}: give numbers separated by commas, e.g. 0.7,0.1,0.2"
        ) from None
    if channels not in (1, 3):
        raise DataError(f"--channels {channels}: use 1 (grayscale) or 3 (RGB)")
    manifest = folder.prepare(
        root,
        out,
        ratios=parts,
        split_by_group=split_by_group,
        channels=channels,
        seed=seed,
        overwrite=overwrite,
    )
    _print_prepared(manifest, out)


OutOpt = Annotated[Path, typer.Option(help="Dataset directory to write.")]
PartialOpt = Annotated[
    bool, typer.Option(help="Accept a copy smaller than the release (recorded in the manifest).")
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace a store from another source.")]


@prepare_app.command("mini-imagenet")
def prepare_mini_imagenet(
    out: OutOpt,
    from_pickles: Annotated[
        Path | None, typer.Option(help="Folder of mini-imagenet-cache-{train,val,test}.pkl.")
    ] = None,
    from_csv: Annotated[
        Path | None, typer.Option(help="Folder of Ravi's train.csv, val.csv, test.csv.")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="Folder of all images, for --from-csv (default CSV/images).")
    ] = None,
    partial: PartialOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """miniImageNet (Ravi & Larochelle split, 64/16/20 classes of 600) from the pickle
    caches or the csv split files."""
    from fewshot.data.sources import mini_imagenet

    manifest = mini_imagenet.prepare(
        out,
        pickles=from_pickles,
        csv_dir=from_csv,
        images=images,
        partial=partial,
        overwrite=overwrite,
    )
    _print_prepared(manifest, out)


@prepare_app.command("tiered-imagenet")
def prepare_tiered_imagenet(
    out: OutOpt,
    from_pickles: Annotated[
        Path | None,
        typer.Option(help="Folder of {split}_images_png.pkl and {split}_labels.pkl."),
    ] = None,
    root: Annotated[
        Path | None, typer.Option(help="ROOT/{train,val,test}/[category/]class/image tree.")
    ] = None,
    partial: PartialOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """tieredImageNet (351/97/160 classes); groups are its 34 super-categories."""
    from fewshot.data.sources import tiered_imagenet

    manifest = tiered_imagenet.prepare(
        out, pickles=from_pickles, root=root, partial=partial, overwrite=overwrite
    )
    _print_prepared(manifest, out)


@prepare_app.command("cub")
def prepare_cub(
    root: Annotated[Path, typer.Option(help="The official CUB_200_2011 folder.")],
    out: OutOpt,
    crop_boxes: Annotated[bool, typer.Option(help="Crop to bounding_boxes.txt.")] = False,
    partial: PartialOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """CUB-200-2011 (100/50/50 classes by sorted class index: even, 1 mod 4, 3 mod 4)."""
    from fewshot.data.sources import cub

    manifest = cub.prepare(root, out, crop_boxes=crop_boxes, partial=partial, overwrite=overwrite)
    _print_prepared(manifest, out)


def _prepare_cifar(
    variant: str, root: Path | None, out: Path, download: bool, partial: bool, overwrite: bool
) -> None:
    from fewshot.data.sources import cifar
    from fewshot.errors import DataError

    if root is None:
        if not download:
            raise DataError("give --root DIR holding cifar-100-python/, or --download")
        root = out.parent / "cifar-100"
    if download:
        cifar.download(root)
    manifest = cifar.prepare(variant, root, out, partial=partial, overwrite=overwrite)
    _print_prepared(manifest, out)


CifarRootOpt = Annotated[
    Path | None, typer.Option(help="Folder holding cifar-100-python/{train,test,meta}.")
]
DownloadOpt = Annotated[
    bool, typer.Option(help="Download CIFAR-100 into --root (or beside --out) first (internet).")
]


@prepare_app.command("cifar-fs")
def prepare_cifar_fs(
    out: OutOpt,
    root: CifarRootOpt = None,
    download: DownloadOpt = False,
    partial: PartialOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """CIFAR-FS (Bertinetto et al.): 64/16/20 CIFAR-100 classes of 600; groups are
    superclasses."""
    _prepare_cifar("cifar-fs", root, out, download, partial, overwrite)


@prepare_app.command("fc100")
def prepare_fc100(
    out: OutOpt,
    root: CifarRootOpt = None,
    download: DownloadOpt = False,
    partial: PartialOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """FC100 (Oreshkin et al.): CIFAR-100 split by superclass, 12/4/4 (60/20/20 classes)."""
    _prepare_cifar("fc100", root, out, download, partial, overwrite)


@prepare_app.command("synthetic")
def prepare_synthetic(
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")] = Path("data/synthetic"),
    classes_per_group: Annotated[int, typer.Option(help="Characters per script.")] = 10,
    images_per_class: Annotated[int, typer.Option(help="Drawings per character.")] = 20,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a store from another source.")] = False,
) -> None:
    """Procedurally drawn glyphs (20 scripts: 12 train, 4 val, 4 test); no download."""
    from fewshot.data.sources import synthetic

    manifest = synthetic.prepare(
        out,
        classes_per_group=classes_per_group,
        images_per_class=images_per_class,
        seed=seed,
        overwrite=overwrite,
    )
    _print_prepared(manifest, out)


@data_app.command("info")
def data_info(directory: Path) -> None:
    """Print a dataset's manifest as a table."""
    from fewshot.data.store import read_manifest

    manifest = read_manifest(directory)
    console.print(_manifest_table(manifest, f"{manifest['name']} ({directory})"))
    norm = manifest["normalisation"]
    console.print(
        f"source {manifest['source']}, {manifest['channels']} channel(s), images "
        f"{manifest['image_shape'][0]}x{manifest['image_shape'][1]}, invert "
        f"{manifest['invert']}, mean {norm['mean']}, std {norm['std']}, partial "
        f"{manifest['partial']}, checksum {manifest['source_checksum'][:16]}"
    )


def _accuracy_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("method", "backbone", "split", "task", "episodes", "accuracy"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["method"],
            row["backbone"],
            row["split"],
            row["task"] + (" within-group" if row["within_group"] else ""),
            str(row["episodes"]),
            f"{100 * row['accuracy']:.2f} +- {100 * row['ci95']:.2f}%",
        )
    return table


@app.command()
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
    console.print(_accuracy_table([evaluation_row(cfg, result.test)], f"run {cfg.name}"))
    _where(result.run_dir, result.run_id, cfg.tracking.uri)
    if cfg.registry.register:
        name = cfg.registry.name or cfg.name
        console.print(f"registered as {name} (@challenger); gate it with: fewshot promote {name}")


def _where(run_dir: Path, run_id: str | None, uri: str | None) -> None:
    from fewshot.tracking import tracking_uri

    console.print(f"model: {run_dir / 'model.pt'}")
    if run_id:
        console.print(
            f"MLflow run {run_id} in {tracking_uri(uri)}; browse with:\n"
            f"  mlflow ui --backend-store-uri {tracking_uri(uri)} --host 127.0.0.1"
        )


@app.command()
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
    console.print(_accuracy_table([evaluation_row(config, accuracy)], f"evaluate {run}"))


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


@app.command()
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
    _print_prepared(synthetic.prepare(data), data)
    cfg = load_config(
        None, [f"data.path={data}", f"train.output_dir={workdir / 'runs'}", *DEMO_SETTINGS]
    )
    console.print(
        f"[bold]2/3[/] train: {cfg.method.name} {cfg.backbone.name}, "
        f"{cfg.episode.n_way}-way {cfg.episode.k_shot}-shot, {cfg.train.steps} steps"
    )
    result = train(cfg, restart=True, progress=True)
    console.print("[bold]3/3[/] evaluation on test scripts never seen in training")
    console.print(_accuracy_table([evaluation_row(cfg, result.test)], "demo"))
    console.print(f"chance is {100 / cfg.episode.n_way:.0f}%")
    _where(result.run_dir, result.run_id, cfg.tracking.uri)


NameArg = Annotated[str, typer.Argument(help="Registered model name.")]


@app.command()
def register(
    run: Annotated[str, typer.Option(help="MLflow run id of a finished training run.")],
    name: Annotated[str, typer.Option(help="Registered model name (created when new).")],
    data: Annotated[
        Path | None, typer.Option(help="The run's prepared dataset, if it moved since training.")
    ] = None,
) -> None:
    """Register a run's model (a pyfunc with its preprocessing) as a new version of NAME,
    with the alias `challenger`."""
    from fewshot.registry.versions import register as register_run

    version = register_run(run, name, data=data)
    console.print(
        f"registered {name} version {version.version} (@challenger), test accuracy "
        f"{version.tags['fewshot.test_acc']} +- {version.tags['fewshot.test_ci95']}; "
        f"gate it with: fewshot promote {name}"
    )


@app.command()
def promote(
    name: NameArg,
    version: Annotated[
        str | None, typer.Option(help="Version to gate (default: the alias challenger).")
    ] = None,
    margin: Annotated[
        float | None,
        typer.Option(help="Accuracy to win by, 0.01 = 1 point (default: its registry.margin)."),
    ] = None,
    confidence: Annotated[
        float | None,
        typer.Option(help="Of the one-sided paired t-test (default: its registry.confidence)."),
    ] = None,
    episodes: Annotated[
        int | None, typer.Option(help="Fixed test episodes (default: its evaluate.episodes).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Evaluation dataset (default: the challenger's).")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Evaluation split (default: the challenger's test split).")
    ] = None,
    force: Annotated[
        str | None,
        typer.Option(metavar="REASON", help="Promote whatever the test says; REASON is recorded."),
    ] = None,
) -> None:
    """Score the challenger and the champion on the same fixed test episodes and move the
    alias `champion` only if a paired t-test shows the challenger better. The decision is
    written to the version's tags; exit status 1 when refused."""
    from fewshot.registry.gate import promote as gate

    decision = gate(
        name,
        version,
        margin=margin,
        confidence=confidence,
        episodes=episodes,
        data=data,
        split=split,
        force=force,
    )
    console.print(decision.summary(), highlight=False)
    if not decision.promoted:
        raise typer.Exit(1)


models_app = typer.Typer(no_args_is_help=True, help="Inspect registered models.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(name: NameArg) -> None:
    """Versions of NAME, newest first: aliases, test accuracy from training, and the last
    gate decision with the challenger's and the champion's accuracy on the gate's episodes."""
    from fewshot.registry.versions import versions

    def percent(tags: dict, key: str) -> str:
        value = tags.get(key, "none")
        return "?" if value == "none" else f"{100 * float(value):.1f}"

    table = Table(title=f"registered model {name} (accuracy %)")
    for column in ("version", "aliases", "method", "test", "gate", "gate scores"):
        table.add_column(column)
    for v in versions(name):
        tags = v.tags
        scores = percent(tags, "gate.challenger_acc")
        if tags.get("gate.champion_version", "none") != "none":
            scores += f" vs {percent(tags, 'gate.champion_acc')} (v{tags['gate.champion_version']})"
        table.add_row(
            str(v.version),
            ", ".join(sorted(v.aliases)),
            tags.get("fewshot.method", ""),
            f"{percent(tags, 'fewshot.test_acc')} +- {percent(tags, 'fewshot.test_ci95')}",
            tags.get("gate.decision", "not gated"),
            scores if "gate.decision" in tags else "",
        )
    console.print(table)


@app.command()
def predict(
    model: Annotated[
        str, typer.Option(help="MLflow model URI: models:/NAME@champion, runs:/ID/fewshot, a path.")
    ],
    support: Annotated[Path, typer.Option(help="One sub-folder of images per class (its label).")],
    query: Annotated[Path, typer.Option(help="Folder of images to classify.")],
) -> None:
    """Classify the query images among the support folder's classes; one JSON line per
    query file, in file-name order: {"file", "label", "probabilities"}."""
    import json

    from fewshot.registry.versions import connect, load
    from fewshot.serve.folders import read_query, read_support

    images, labels = read_support(support)  # refuse bad folders before loading the model
    names, queries = read_query(query)
    if model.startswith(("models:/", "runs:/")):
        connect()  # these resolve through the tracking store: refuse a missing one
    answers = load(model).classify(images, labels, queries)
    for file, answer in zip(names, answers, strict=True):
        print(json.dumps({"file": file, **answer}))


@app.command()
def serve(
    name: NameArg,
    alias: Annotated[str, typer.Option(help="Alias of the version to serve.")] = "champion",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
    host: Annotated[
        str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")
    ] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="Server processes, each with the model.")] = 1,
) -> None:
    """Serve models:/NAME@ALIAS with MLflow's scoring server.

    POST /invocations (application/json) a body {"inputs": {"support_images": ...,
    "support_labels": ..., "query_images": ...}}, the images as lists of base64 PNG or JPEG
    and the labels as a list of strings; the answer is {"predictions": ...}, one
    {"label", "probabilities"} per query. A newly promoted champion is served after a restart.
    """
    from fewshot.serve.server import serve as run_server

    run_server(name, alias, host=host, port=port, workers=workers)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; results go to benchmarks/results.")
app.add_typer(bench_app, name="bench")


@bench_app.command("distributed")
def bench_distributed(
    steps: Annotated[int, typer.Option(help="Training steps per setting.")] = 200,
    out: Annotated[Path, typer.Option(help="Markdown table to write.")] = Path(
        "benchmarks/results/distributed.md"
    ),
    workdir: Annotated[Path, typer.Option(help="Scratch folder for data and runs.")] = Path(
        "runs/bench"
    ),
) -> None:
    """Episodes/s of the bare loop vs Ray Train with 1 and 2 workers."""
    from fewshot.bench import distributed

    distributed.run(workdir, out, steps)
    console.print(out.read_text())


@bench_app.command("data")
def bench_data(
    out: Annotated[Path, typer.Option(help="Markdown file to write.")] = Path(
        "benchmarks/results/data.md"
    ),
    workdir: Annotated[
        Path, typer.Option(help="Scratch folder for the synthetic store (about 0.3 GB).")
    ] = Path("runs/bench"),
    images_per_class: Annotated[
        int, typer.Option(min=20, help="Images per class of the 1,000 training classes.")
    ] = 100,
    seconds: Annotated[float, typer.Option(min=1, help="Seconds of sampling per mode.")] = 10,
) -> None:
    """Node memory with 1 and 2 workers sharing the data, and sampler episodes/s, with
    images decoded up front and decoded per episode."""
    from fewshot.bench import data

    data.run(workdir, out, images_per_class, seconds)
    console.print(out.read_text())


@bench_app.command("methods")
def bench_methods(
    config: Annotated[Path, typer.Option(help="Bench file: base config, tasks, rows.")] = Path(
        "jobs/configs/bench_methods.yaml"
    ),
    out: Annotated[Path, typer.Option(help="Markdown table to write.")] = Path(
        "benchmarks/results/methods.md"
    ),
    set_: SetOpt = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this row (repeatable), by name.")
    ] = None,
) -> None:
    """Train every method and ablation with one budget; test all on the same episodes."""
    from fewshot.bench import methods

    methods.run(config, out, set_, only)
    console.print(out.read_text())


@bench_app.command("speed")
def bench_speed(
    out: Annotated[Path, typer.Option(help="Markdown table to write.")] = Path(
        "benchmarks/results/speed.md"
    ),
    data: Annotated[
        Path, typer.Option(help="Folder with the Omniglot small background zips.")
    ] = Path("../shared/datasets/omniglot"),
    workdir: Annotated[Path, typer.Option(help="Scratch folder for the store.")] = Path(
        "runs/bench-speed"
    ),
    episodes: Annotated[int, typer.Option(help="Timed training episodes per contender.")] = 300,
    threads: Annotated[int, typer.Option(help="torch threads for every contender.")] = 2,
) -> None:
    """Training episodes/s of our ProtoNet and MAML against easyfsl's and learn2learn's
    loops, the sampler, conversion, and the loop's overhead over bare compute."""
    from fewshot.bench import speed

    zips = [data / f"images_background_small{i}.zip" for i in (1, 2)]
    speed.run(out, zips, workdir, episodes=episodes, threads=threads)
    console.print(out.read_text())


@bench_app.command("omniglot")
def bench_omniglot(
    config: Annotated[Path, typer.Option(help="Bench file: base recipe and rows.")] = Path(
        "jobs/configs/bench_omniglot.yaml"
    ),
    out: Annotated[Path, typer.Option(help="Markdown table to write (plot: same name .png).")] = (
        Path("benchmarks/results/omniglot.md")
    ),
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this row (repeatable), by name.")
    ] = None,
) -> None:
    """The Omniglot recipe: each lever on and off, and both cross-validation directions."""
    from fewshot.bench import omniglot

    omniglot.run(config, out, only)
    console.print(out.read_text())


@bench_app.command("gpu")
def bench_gpu(
    steps: Annotated[int, typer.Option(help="Timed steps per row.")] = 200,
    out: Annotated[Path, typer.Option(help="Markdown table to write.")] = Path(
        "benchmarks/results/gpu.md"
    ),
) -> None:
    """Episodes/s on this machine's GPU: our loop, bare compute and easyfsl's loop."""
    from fewshot.bench import gpu

    gpu.run(out, steps)
    console.print(out.read_text())


@app.command()
def tune(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Tune file: base config, space, search settings."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a setting of the base config (repeatable)."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option(metavar="NAME", help="Continue the interrupted search NAME.")
    ] = None,
) -> None:
    """Search hyper-parameters with Ray Tune (each trial a Ray Train run, scored on
    validation classes), test the best config's model, print the best config and the
    top trials. Format of the tune file: jobs/configs/tune_subspace.yaml."""
    from fewshot.config import resolved_yaml
    from fewshot.tune.search import run_search

    result = run_search(config, set_, resume)
    table = Table(title=f"search {result.name}: top trials ({len(result.rows)} in all)")
    for column in ("trial", *result.paths, "val_acc", "rounds", "stopped early"):
        table.add_column(column)
    for row in result.rows[:5]:
        table.add_row(
            row["trial"].removeprefix(f"{result.name}-"),
            *[_short(row["values"][p]) for p in result.paths],
            f"{100 * row['val_acc']:.2f}%",
            f"{row['rounds']}/{row['max_rounds']}",
            "yes" if row["stopped_early"] else "no",
        )
    console.print(table)
    if result.failed:
        console.print(f"{result.failed} trial(s) failed; Tune's output above has their errors")
    console.print(
        f"best {result.best['trial']}: val_acc {100 * result.best['val_acc']:.2f}%, "
        f"test {result.test} on {result.best_config.data.test_split}"
    )
    _where(result.search_dir, result.parent_run_id, result.best_config.tracking.uri)
    print(f"# best config ({result.search_dir / 'best_config.yaml'}); train it with:")
    print("#   fewshot train --config best_config.yaml")
    print(resolved_yaml(result.best_config), end="")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


jobs_app = typer.Typer(no_args_is_help=True, help="Follow and control cluster jobs.")
app.add_typer(jobs_app, name="jobs")
AddressOpt = Annotated[
    str, typer.Option(envvar="RAY_API_SERVER_ADDRESS", help="The Ray dashboard (Jobs API) address.")
]
DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="YAML config, relative to the working dir.")],
    address: AddressOpt = DEFAULT_JOBS_ADDRESS,
    set_: SetOpt = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow server the job logs to."),
    ] = None,
    working_dir: Annotated[Path, typer.Option(help="Repository root to ship.")] = Path("."),
    python: Annotated[
        str | None,
        typer.Option(
            help="Python on the cluster (default: this one for a local head, else python)."
        ),
    ] = None,
) -> None:
    """Submit `fewshot train --config CONFIG` as a Ray job; prints the job id."""
    from fewshot import jobs
    from fewshot.config import load_config

    load_config(working_dir / config, set_)  # refuse a bad config before it travels
    args = ["--config", str(config), *[a for item in set_ or [] for a in ("--set", item)]]
    env = {"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}
    job_id = jobs.submit("train", args, address, working_dir=working_dir, python=python, env=env)
    print(job_id)
    if follow:
        final = jobs.follow(address, job_id, lambda lines: print(lines, end=""))
        print(f"job {job_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOpt = DEFAULT_JOBS_ADDRESS) -> None:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from fewshot import jobs

    print(jobs.status(address, job_id))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: AddressOpt = DEFAULT_JOBS_ADDRESS,
    follow: Annotated[bool, typer.Option(help="Keep streaming until the job ends.")] = False,
) -> None:
    """Print a job's logs."""
    from fewshot import jobs

    if follow:
        print(f"job {job_id}: {jobs.follow(address, job_id, lambda s: print(s, end=''))}")
    else:
        print(jobs.logs(address, job_id), end="")


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOpt = DEFAULT_JOBS_ADDRESS) -> None:
    """Stop a running job."""
    from fewshot import jobs

    print("stopped" if jobs.stop(address, job_id) else "was not running")


def main() -> None:
    try:
        app()
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
