"""The model registry's commands: register a run, promote it through the gate, list the
versions (`fewshot models`), serve one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fewshot.cli.common import console
from fewshot.errors import ServeError

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]

models_app = typer.Typer(no_args_is_help=True, help="Inspect registered models.")


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


def serve(
    name: NameArg,
    alias: Annotated[str, typer.Option(help="Alias of the version to serve.")] = "champion",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
    host: Annotated[
        str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")
    ] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="Server processes, each with the model.")] = 1,
    ray: Annotated[
        bool, typer.Option("--ray", help="Serve on Ray Serve (replicas, cached supports).")
    ] = False,
    replicas: Annotated[int, typer.Option(help="--ray: replicas of the model.")] = 1,
    autoscale: Annotated[
        str | None, typer.Option(help="--ray: MIN,MAX replicas, scaled by load.")
    ] = None,
    follow_alias: Annotated[
        bool, typer.Option(help="--ray: move to the version the alias moves to, live.")
    ] = False,
    cache_mb: Annotated[float, typer.Option(help="--ray: cached support sets, MB.")] = 256,
    cache_ttl: Annotated[
        float, typer.Option(help="--ray: seconds an unused support set stays cached.")
    ] = 3600,
    cpus_per_replica: Annotated[
        float, typer.Option(help="--ray: CPUs per replica (its torch threads).")
    ] = 1.0,
    test_views: Annotated[
        int | None,
        typer.Option(help="Test views to compute (1: none, cheapest); default: as trained."),
    ] = None,
) -> None:
    """Serve models:/NAME@ALIAS with MLflow's scoring server, or with --ray on Ray Serve.

    POST /invocations (application/json) a body {"inputs": {"support_images": ...,
    "support_labels": ..., "query_images": ...}}, the images as lists of base64 PNG or JPEG
    and the labels as a list of strings; the answer is {"predictions": ...}, one
    {"label", "probabilities"} per query. A newly promoted champion is served after a restart,
    or at once with --ray --follow-alias. With --ray, POST /supports caches a support set and
    POST /classify answers queries against its id (docs/serving.md).
    """
    from fewshot.serve.server import Options

    options = Options(
        host=host,
        port=port,
        workers=workers,
        replicas=replicas,
        autoscale=parse_range(autoscale),
        cache_mb=cache_mb,
        cache_ttl_s=cache_ttl,
        cpus_per_replica=cpus_per_replica,
        test_views=test_views,
    )
    if not ray:
        from fewshot.serve.server import serve as run_server

        run_server(name, alias, options)
    from fewshot.serve.ray_app import run

    run(name, alias, options, follow_alias=follow_alias)


def parse_range(text: str | None) -> tuple[int, int] | None:
    """--autoscale MIN,MAX -> (MIN, MAX)."""
    if text is None:
        return None
    low, _, high = text.partition(",")
    if not (low.strip().isdigit() and high.strip().isdigit()) or not 1 <= int(low) <= int(high):
        raise ServeError(
            f"--autoscale {text!r}: give MIN,MAX replicas with 1 <= MIN <= MAX, e.g. 1,4"
        )
    return int(low), int(high)
