"""`fewshot gallery`: named, versioned support sets kept in the tracking store, so the
classes a model was taught outlive any server (registry/galleries.py). Every change is a
new version; `rollback` makes a new version equal to an older one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fewshot.cli.common import console

gallery_app = typer.Typer(
    no_args_is_help=True,
    help="Named, versioned sets of classes and their support images, kept in MLflow.",
)
NameArg = Annotated[str, typer.Argument(help="Gallery name.")]
ClassOpt = Annotated[str, typer.Option("--class", help="The class's label.")]


def said(version) -> None:
    console.print(
        f"gallery {version.gallery} version {version.version}: {version.change} "
        f"({version.classes} classes, {version.images} images)",
        highlight=False,
    )


def when(version) -> str:
    return datetime.fromtimestamp(version.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@gallery_app.command()
def create(
    name: NameArg,
    model: Annotated[
        str, typer.Option(help="Model it answers with: models:/NAME@champion, runs:/ID/fewshot.")
    ],
    support: Annotated[Path, typer.Option(help="One sub-folder of images per class (its label).")],
) -> None:
    """Create gallery NAME, version 1, from a folder of class sub-folders."""
    from fewshot.registry import galleries
    from fewshot.serve.folders import read_support

    images, labels = read_support(support)
    said(galleries.create(name, model, images, labels))


@gallery_app.command()
def add(
    name: NameArg,
    label: ClassOpt,
    images: Annotated[list[Path], typer.Argument(help="Image files of the class.")],
) -> None:
    """Add images to a class of NAME (a new class if the label is new): a new version."""
    from fewshot.registry import galleries
    from fewshot.serve.folders import read_images

    said(galleries.add(name, label, read_images(images, "image")))


@gallery_app.command()
def remove(name: NameArg, label: ClassOpt) -> None:
    """Remove a class and its images from NAME: a new version."""
    from fewshot.registry import galleries

    said(galleries.remove(name, label))


@gallery_app.command()
def rollback(
    name: NameArg,
    version: Annotated[int, typer.Option(help="The version whose content to restore.")],
) -> None:
    """Make a new version of NAME whose classes and images equal those of VERSION."""
    from fewshot.registry import galleries

    said(galleries.rollback(name, version))


@gallery_app.command("list")
def gallery_list() -> None:
    """Every gallery with its latest version."""
    from fewshot.registry import galleries

    table = Table(title="galleries")
    for column in ("gallery", "version", "classes", "images", "model", "changed (UTC)"):
        table.add_column(column)
    for v in galleries.galleries():
        table.add_row(v.gallery, str(v.version), str(v.classes), str(v.images), v.model, when(v))
    console.print(table)


@gallery_app.command()
def show(
    name: NameArg,
    version: Annotated[int | None, typer.Option(help="Version to show (default: latest).")] = None,
) -> None:
    """A version's classes with their image counts, and the gallery's history."""
    from fewshot.registry import galleries

    shown = galleries.get(name, version)
    counts: dict[str, int] = {}
    for e in galleries.entries(shown):
        counts[e.label] = counts.get(e.label, 0) + 1
    console.print(f"gallery {name} version {shown.version}, model {shown.model}", highlight=False)
    classes = Table()
    classes.add_column("class")
    classes.add_column("images", justify="right")
    for label, count in counts.items():
        classes.add_row(label, str(count))
    history = Table(title=f"versions of {name}")
    for column in ("version", "change", "classes", "images", "created (UTC)"):
        history.add_column(column)
    for v in galleries.history(name):
        history.add_row(str(v.version), v.change, str(v.classes), str(v.images), when(v))
    console.print(classes, history)
