"""`fewshot tune`: a hyper-parameter search, its top trials and its best config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fewshot.cli.common import console, print_where


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
    top trials. Format of the tune file: jobs/configs/tune/subspace.yaml."""
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
    print_where(result.search_dir, result.parent_run_id, result.best_config.tracking.uri)
    print(f"# best config ({result.search_dir / 'best_config.yaml'}); train it with:")
    print("#   fewshot train --config best_config.yaml")
    print(resolved_yaml(result.best_config), end="")


def _short(value) -> str:
    """A trial's value of one searched setting, in a table cell: floats to 4 digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
