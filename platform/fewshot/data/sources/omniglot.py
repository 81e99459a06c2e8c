"""Omniglot from the official zips (Lake et al.), e.g. images_background_small1.zip.

Each zip becomes one split, named after the zip (`images_background_small1.zip` ->
`small1`, `images_evaluation.zip` -> `evaluation`). A class is one character
(`Alphabet/characterNN`); its group is the alphabet. Drawings are dark on white,
so the manifest asks for inversion: ink is high, background zero.

Zips that share drawings are merged: `images_background_small1.zip` and
`images_background_small2.zip` both hold Greek and Latin, and their 1,000 drawings are
byte-identical. A character of a later zip (in the order given) whose drawings are all
those of a character already stored is dropped from its split: the first zip keeps it.
The splits stay one per zip, disjoint in characters: small1 keeps its 5 alphabets (136
characters) and small2 keeps Japanese_(katakana), Sanskrit and Tagalog (106): 8
distinct alphabets, 242 distinct characters. So training on [small1, small2] sees every
character once, under one label, each alphabet is one group, and a within-alphabet
episode can never hold a character and its copy as two classes. Keeping the splits
(rather than one merged split) keeps `train_split: [small1, small2]` working and makes
small1 -> small2 a test on alphabets never trained on. The manifest's `merged` records
every dropped character (zip, split, alphabet, character, the character it copies) and
the counts. A character that shares only some drawings with another is refused: that
is not a copy, and dropping part of a character would change the task.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

from fewshot.data.decode import check_image, check_size, read_limited
from fewshot.data.store import (
    MANIFEST,
    Example,
    SourceInfo,
    read_manifest,
    sha256_files,
    write_store,
)
from fewshot.errors import DataError

# (classes, alphabets) of each official release, to refuse a partial copy.
KNOWN_COUNTS = {
    "background": (964, 30),
    "evaluation": (659, 20),
    "small1": (136, 5),
    "small2": (156, 5),
}
IMAGES_PER_CLASS = 20
# Part of the store's checksum: a store written before merging (the same zips, another
# checksum) is rebuilt instead of reused.
MERGE_VERSION = "merged1"
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
            drawings = [
                (path, member)
                for member in sorted(archive.infolist(), key=lambda m: m.filename)
                if (path := PurePosixPath(member.filename)).suffix.lower() == ".png"
                and len(path.parts) >= 3
            ]
            # Declared sizes before anything is inflated (the CRC check inflates it all).
            for _, member in drawings:
                check_size(member.file_size, f"{zip_path}:{member.filename}")
            broken = archive.testzip()
            if broken is not None:
                raise DataError(f"{zip_path}: {broken} fails its CRC check; download it again")
            examples = []
            for path, member in drawings:
                where = f"{zip_path}:{member.filename}"
                with archive.open(member) as handle:  # its header may understate its size
                    data = read_limited(handle, where)
                check_image(data, where)
                alphabet, character = path.parts[-3], path.parts[-2]
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


def content_hash(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


def merge_duplicates(
    splits: dict[str, list[Example]], zips: dict[str, Path]
) -> tuple[dict[str, list[Example]], dict]:
    """(`splits` without the characters that copy one of an earlier split, the manifest's
    `merged` record). Splits are visited in order: the first to hold a character keeps it."""
    owner: dict[str, tuple[str, str]] = {}  # drawing hash -> (split, character) kept
    kept: dict[str, list[Example]] = {}
    dropped = []
    for split, examples in splits.items():
        characters: dict[str, list[Example]] = {}
        for example in examples:
            characters.setdefault(example.class_name, []).append(example)
        kept[split] = []
        mine: dict[str, tuple[str, str]] = {}
        for character, drawings in characters.items():
            hashes = [content_hash(e.image) for e in drawings]
            copied = Counter(owner[h] for h in hashes if h in owner)
            if not copied:
                kept[split].extend(drawings)
                mine.update((h, (split, character)) for h in hashes)
                continue
            original, shared = copied.most_common(1)[0]
            originals = sum(o == original for o in owner.values())
            if not shared == len(hashes) == originals:
                raise DataError(
                    f"{zips[split]}: {character} shares {shared} of its {len(hashes)} drawings "
                    f"with {original[0]}/{original[1]}, which has {originals}: not a copy; the "
                    "zips overlap in part, prepare them into separate stores (--out)"
                )
            dropped.append(
                {
                    "zip": zips[split].name,
                    "split": split,
                    "alphabet": drawings[0].group,
                    "character": character,
                    "images": len(drawings),
                    "duplicate_of": {"split": original[0], "character": original[1]},
                }
            )
        if not kept[split]:
            raise DataError(
                f"{zips[split]}: every character is a copy of one in an earlier zip; leave "
                "this zip out or prepare it into a store of its own (--out)"
            )
        owner.update(mine)
    record = {
        "rule": "a character whose drawings are byte-identical (sha256) to one of an earlier "
        "zip is dropped from its split; the first zip given keeps it",
        "characters_dropped": len(dropped),
        "images_dropped": sum(d["images"] for d in dropped),
        "characters_per_zip": {
            zips[s].name: len({e.class_name for e in examples}) for s, examples in splits.items()
        },
        "dropped": dropped,
    }
    return kept, record


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
    zips, out = [Path(z) for z in zips], Path(out)
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
    splits, merged = merge_duplicates(splits, dict(zip(names, zips, strict=True)))
    raw = sha256_files(zips) + ("-partial" if partial else "")
    if (out / MANIFEST).is_file() and read_manifest(out).get("source_checksum") == raw:
        overwrite = True  # the same zips, stored before duplicates were merged: redo it
    info = SourceInfo(
        name="omniglot",
        source="omniglot",
        checksum=f"{raw}-{MERGE_VERSION}",
        channels=1,
        image_shape=(105, 105),
        invert=True,
        partial=partial,
        extra={"merged": merged},
    )
    return write_store(out, info, splits, overwrite=overwrite)
