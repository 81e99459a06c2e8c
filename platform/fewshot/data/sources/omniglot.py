"""Omniglot from the official zips (Lake et al.), e.g. images_background_small1.zip.

Each zip becomes one split, named after the zip (`images_background_small1.zip` ->
`small1`, `images_evaluation.zip` -> `evaluation`). A class is one character
(`Alphabet/characterNN`); its group is the alphabet. Drawings are dark on white,
so the manifest asks for inversion: ink is high, background zero.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from fewshot.data.decode import check_image
from fewshot.data.store import Example, SourceInfo, sha256_files, write_store
from fewshot.errors import DataError

# (classes, alphabets) of each official release, to refuse a partial copy.
KNOWN_COUNTS = {
    "background": (964, 30),
    "evaluation": (659, 20),
    "small1": (136, 5),
    "small2": (156, 5),
}
IMAGES_PER_CLASS = 20
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"


def split_name(zip_path: Path) -> str:
    stem = zip_path.stem
    for prefix in ("images_background_", "images_"):
        if stem.startswith(prefix):
            return stem[len(prefix) :]
    return stem


def read_zip(zip_path: Path) -> list[Example]:
    if not zip_path.is_file():
        raise DataError(f"{zip_path} does not exist; pass --from-zip PATH to an Omniglot zip")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            broken = archive.testzip()
            if broken is not None:
                raise DataError(f"{zip_path}: {broken} fails its CRC check; download it again")
            examples = []
            for member in sorted(archive.namelist()):
                path = PurePosixPath(member)
                if path.suffix.lower() != ".png" or len(path.parts) < 3:
                    continue
                alphabet, character = path.parts[-3], path.parts[-2]
                data = archive.read(member)
                check_image(data, f"{zip_path}:{member}")
                examples.append(Example(f"{alphabet}/{character}", alphabet, data))
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{zip_path}: not a readable zip ({exc}); download it again") from None
    if not examples:
        raise DataError(f"{zip_path}: no PNG drawings inside; is it an Omniglot zip?")
    return examples


def check_counts(name: str, examples: list[Example], zip_path: Path) -> None:
    classes = {e.class_name for e in examples}
    alphabets = {e.group for e in examples}
    expected = KNOWN_COUNTS.get(name)
    if expected and (len(classes), len(alphabets)) != expected:
        raise DataError(
            f"{zip_path}: {len(classes)} characters in {len(alphabets)} alphabets, expected "
            f"{expected[0]} in {expected[1]}; the copy is partial (pass --partial to accept it)"
        )
    if len(examples) != IMAGES_PER_CLASS * len(classes):
        raise DataError(
            f"{zip_path}: {len(examples)} drawings for {len(classes)} characters, expected "
            f"{IMAGES_PER_CLASS} each; the copy is partial (pass --partial to accept it)"
        )


def download(root: Path, names: list[str]) -> list[Path]:
    """Fetch the official zips through torchvision's downloader (needs internet)."""
    from torchvision.datasets.utils import download_url

    paths = []
    for name in names:
        filename = (
            f"images_{name}.zip"
            if name in ("background", "evaluation")
            else (f"images_background_{name}.zip")
        )
        download_url(f"{URL}/{filename}", str(root), filename)
        paths.append(root / filename)
    return paths


def prepare(zips: list[Path], out: Path, *, partial: bool = False, overwrite: bool = False) -> dict:
    zips = [Path(z) for z in zips]
    if not zips:
        raise DataError("no Omniglot zip given; pass --from-zip PATH (repeatable) or --download")
    names = [split_name(z) for z in zips]
    if len(set(names)) != len(names):
        raise DataError(f"two zips map to the same split name {names}; pass each zip once")
    splits = {}
    for name, zip_path in zip(names, zips, strict=True):
        examples = read_zip(zip_path)
        if not partial:
            check_counts(name, examples, zip_path)
        splits[name] = examples
    info = SourceInfo(
        name="omniglot",
        source="omniglot",
        checksum=sha256_files(zips) + ("-partial" if partial else ""),
        channels=1,
        image_shape=(105, 105),
        invert=True,
        partial=partial,
    )
    return write_store(out, info, splits, overwrite=overwrite)
