"""What every sub-app of the `fewshot` command line shares: the console, the options that
more than one sub-app takes, the tables, and the handling of user errors.

The commands import the rest of the package inside their bodies: `fewshot --help` and a
mistyped option then answer without loading torch, Ray or MLflow.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fewshot.errors import FewShotError

console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: --set train.steps=500 (repeatable)."),
]


@contextmanager
def user_errors_exit_2() -> Iterator[None]:
    """A FewShotError is the user's to fix (a bad file, option or setting), so it prints
    one line, `error: MESSAGE`, on stderr and exits 2, without a traceback."""
    try:
        yield
    except FewShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def manifest_table(manifest: dict, title: str) -> Table:
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


def print_prepared(manifest: dict, out: Path) -> None:
    console.print(manifest_table(manifest, f"{manifest['name']} -> {out}"))


def accuracy_table(rows: list[dict], title: str) -> Table:
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


def print_where(run_dir: Path, run_id: str | None, uri: str | None) -> None:
    """Where a run's model and its MLflow run are, and how to browse the latter."""
    from fewshot.tracking import tracking_uri

    console.print(f"model: {run_dir / 'model.pt'}")
    if run_id:
        console.print(
            f"MLflow run {run_id} in {tracking_uri(uri)}; browse with:\n"
            f"  mlflow ui --backend-store-uri {tracking_uri(uri)} --host 127.0.0.1"
        )
