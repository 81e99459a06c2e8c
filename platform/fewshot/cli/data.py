"""`fewshot data`: convert a source into a dataset store, and print a store's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fewshot.cli.common import console, manifest_table, print_prepared
from fewshot.errors import DataError

data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect datasets.")
prepare_app = typer.Typer(no_args_is_help=True, help="Convert a source into a dataset store.")
data_app.add_typer(prepare_app, name="prepare")


def _writable_out(out: Path) -> Path:
    """Refuse an --out where no store can be written before reading or downloading."""
    from fewshot.data.store import check_out

    check_out(out)
    return out


OutOpt = Annotated[Path, typer.Option(help="Dataset directory to write.", callback=_writable_out)]
PartialOpt = Annotated[
    bool, typer.Option(help="Accept a copy smaller than the release (recorded in the manifest).")
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace a store from another source.")]
CifarRootOpt = Annotated[
    Path | None, typer.Option(help="Folder holding cifar-100-python/{train,test,meta}.")
]
DownloadOpt = Annotated[
    bool, typer.Option(help="Download CIFAR-100 into --root (or beside --out) first (internet).")
]


@prepare_app.command("omniglot")
def prepare_omniglot(
    out: OutOpt,
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
    overwrite: OverwriteOpt = False,
) -> None:
    """Omniglot: one split per zip (small1, small2, background, evaluation); groups are
    alphabets; a character that copies one of an earlier zip is stored once."""
    from fewshot.data.sources import omniglot

    zips = list(from_zip or [])
    if download:
        zips += omniglot.download(out.parent / "omniglot-zips", ["background", "evaluation"])
    manifest = omniglot.prepare(zips, out, partial=partial, overwrite=overwrite)
    print_prepared(manifest, out)
    merged = manifest["merged"]
    if merged["characters_dropped"]:
        console.print(
            f"merged: {merged['characters_dropped']} characters ({merged['images_dropped']} "
            "drawings) copy those of an earlier zip and are stored once; manifest.json "
            "`merged` names them"
        )


@prepare_app.command("folder")
def prepare_folder(
    root: Annotated[Path, typer.Option(help="ROOT/class/image (or ROOT/group/class/image).")],
    out: OutOpt,
    ratios: Annotated[
        str, typer.Option(help="Class fractions for train,val,test.")
    ] = "0.64,0.16,0.2",
    split_by_group: Annotated[
        bool, typer.Option(help="Tree is ROOT/group/class/image; whole groups go to one split.")
    ] = False,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the class-to-split shuffle.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Any folder tree of class folders, cut into disjoint train/val/test classes."""
    from fewshot.data.sources import folder

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
    print_prepared(manifest, out)


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
    print_prepared(manifest, out)


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
    print_prepared(manifest, out)


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
    print_prepared(manifest, out)


def _prepare_cifar(
    variant: str, root: Path | None, out: Path, download: bool, partial: bool, overwrite: bool
) -> None:
    """Both CIFAR-100 splits: CIFAR-FS and FC100 differ only in `variant`."""
    from fewshot.data.sources import cifar

    if root is None:
        if not download:
            raise DataError("give --root DIR holding cifar-100-python/, or --download")
        root = out.parent / "cifar-100"
    if download:
        cifar.download(root)
    manifest = cifar.prepare(variant, root, out, partial=partial, overwrite=overwrite)
    print_prepared(manifest, out)


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
    out: OutOpt = Path("data/synthetic"),
    classes_per_group: Annotated[int, typer.Option(help="Characters per script.")] = 10,
    images_per_class: Annotated[int, typer.Option(help="Drawings per character.")] = 20,
    seed: int = 0,
    overwrite: OverwriteOpt = False,
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
    print_prepared(manifest, out)


@data_app.command("info")
def data_info(directory: Path) -> None:
    """Print a dataset's manifest as a table."""
    from fewshot.data.store import read_manifest

    manifest = read_manifest(directory)
    console.print(manifest_table(manifest, f"{manifest['name']} ({directory})"))
    norm = manifest["normalisation"]
    console.print(
        f"source {manifest['source']}, {manifest['channels']} channel(s), images "
        f"{manifest['image_shape'][0]}x{manifest['image_shape'][1]}, invert "
        f"{manifest['invert']}, mean {norm['mean']}, std {norm['std']}, partial "
        f"{manifest['partial']}, checksum {manifest['source_checksum'][:16]}"
    )
