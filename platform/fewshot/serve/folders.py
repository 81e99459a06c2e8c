"""Support and query folders, as `fewshot predict` reads them.

    SUPPORT/LABEL/image...   one sub-folder per class; the folder name is the label
    QUERY/image...           the images to classify, answered in file-name order

`read_images` reads image files named one by one (`fewshot gallery add`).

Hidden files (`.DS_Store`) are skipped; any other file must be an image, so a stray
file is reported rather than silently ignored.
"""

from __future__ import annotations

from pathlib import Path

from fewshot.data.decode import check_image, check_size
from fewshot.errors import RequestError


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def _read(path: Path) -> bytes:
    """The file's bytes, refused with its name when they are not an image (a file too
    large to be one is refused unread)."""
    check_size(path.stat().st_size, str(path))
    data = path.read_bytes()
    check_image(data, str(path))
    return data


def _directory(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise RequestError(f"{what} {path}: not a directory; pass a folder of {layout}")
    return path


def read_support(directory: Path) -> tuple[list[bytes], list[str]]:
    """SUPPORT/LABEL/* -> (encoded images, labels), classes in name order."""
    directory = _directory(Path(directory), "--support", "class sub-folders")
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise RequestError(
            f"--support {directory}: {len(classes)} class folder(s); make one sub-folder of "
            "images per class, at least 2"
        )
    images, labels = [], []
    for folder in classes:
        files = _files(folder)
        if not files:
            raise RequestError(f"--support {folder}: no images; put at least one image in it")
        images += [_read(f) for f in files]
        labels += [folder.name] * len(files)
    return images, labels


def read_query(directory: Path) -> tuple[list[str], list[bytes]]:
    """QUERY/* -> (file names, encoded images), in file-name order."""
    directory = _directory(Path(directory), "--query", "images")
    files = _files(directory)
    if not files:
        raise RequestError(f"--query {directory}: no image files; put the images to classify in it")
    return [f.name for f in files], [_read(f) for f in files]


def read_images(paths: list[Path], what: str) -> list[bytes]:
    """Image files named one by one -> their encoded bytes, in the order given."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise RequestError(f"{what} {missing[0]}: not a file; name image files")
    return [_read(Path(p)) for p in paths]
