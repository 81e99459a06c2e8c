"""`fewshot bench`: each benchmark writes its Markdown result and prints it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fewshot.cli.common import SetOpt, console

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; results go to benchmarks/results.")

TableOutOpt = Annotated[Path, typer.Option(help="Markdown table to write.")]
OnlyOpt = Annotated[list[str] | None, typer.Option(help="Run only this row (repeatable), by name.")]


@bench_app.command("distributed")
def bench_distributed(
    steps: Annotated[int, typer.Option(help="Training steps per setting.")] = 200,
    out: TableOutOpt = Path("benchmarks/results/distributed.md"),
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
    nodes: Annotated[
        int,
        typer.Option(
            min=0,
            help="Instead: start this many Ray worker nodes here and measure each node's "
            "object store and memory with 1 and 2 workers (the `Across nodes` section).",
        ),
    ] = 0,
) -> None:
    """Node memory with 1 and 2 workers sharing the data, and sampler episodes/s, with
    images decoded up front and decoded per episode; or, with --nodes, per node."""
    from fewshot.bench import data

    if nodes:
        data.run_nodes(workdir, out, nodes, images_per_class)
    else:
        data.run(workdir, out, images_per_class, seconds)
    console.print(out.read_text())


@bench_app.command("methods")
def bench_methods(
    config: Annotated[Path, typer.Option(help="Bench file: base config, tasks, rows.")] = Path(
        "jobs/configs/bench/methods.yaml"
    ),
    out: TableOutOpt = Path("benchmarks/results/methods.md"),
    set_: SetOpt = None,
    only: OnlyOpt = None,
) -> None:
    """Train every method and ablation with one budget; test all on the same episodes."""
    from fewshot.bench import methods

    methods.run(config, out, set_, only)
    console.print(out.read_text())


OmniglotOpt = Annotated[Path, typer.Option(help="Folder with the Omniglot small background zips.")]


@bench_app.command("speed")
def bench_speed(
    out: TableOutOpt = Path("benchmarks/results/speed.md"),
    data: OmniglotOpt = Path("../shared/datasets/omniglot"),
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
        "jobs/configs/bench/omniglot.yaml"
    ),
    out: Annotated[Path, typer.Option(help="Markdown table to write (plot: same name .png).")] = (
        Path("benchmarks/results/omniglot.md")
    ),
    only: OnlyOpt = None,
) -> None:
    """The Omniglot recipe: each lever on and off (jobs/configs/bench/omniglot.yaml), or
    leave-alphabets-out folds with a bench file's `folds:`
    (jobs/configs/bench/omniglot_folds.yaml, with --out benchmarks/results/omniglot_folds.md)."""
    from fewshot.bench import omniglot

    omniglot.run(config, out, only)
    console.print(out.read_text())


@bench_app.command("gpu")
def bench_gpu(
    steps: Annotated[int, typer.Option(help="Timed steps per row.")] = 200,
    out: TableOutOpt = Path("benchmarks/results/gpu.md"),
) -> None:
    """Episodes/s on this machine's GPU: our loop, bare compute and easyfsl's loop."""
    from fewshot.bench import gpu

    gpu.run(out, steps)
    console.print(out.read_text())


@bench_app.command("serve")
def bench_serve(
    out: TableOutOpt = Path("benchmarks/results/serve.md"),
    data: OmniglotOpt = Path("../shared/datasets/omniglot"),
    workdir: Annotated[Path, typer.Option(help="Scratch folder: store, runs, registry.")] = Path(
        "runs/bench-serve"
    ),
    requests: Annotated[int, typer.Option(min=10, help="Timed requests per cell.")] = 100,
) -> None:
    """p50/p99 latency and requests/s of 20-way 1-shot requests to the model `make omniglot`
    promotes: the bare model in-process, MLflow's scoring server, Ray Serve with 1 and 2
    replicas; full requests, cached support sets and a gallery; and the stages of one
    request."""
    from fewshot.bench import serve

    serve.run(workdir, out, data, requests)
    console.print(out.read_text())
