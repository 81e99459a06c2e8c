"""Two rules, each with one home: weights are loaded without running code from the file,
and a directory is deleted only from inside the root it belongs to.

A `.pt` file is a pickle: loaded without torch's weights-only unpickler, any file (a
run, a registered model's artifact, a Ray checkpoint on shared storage) could run code
in the process that opens it. Every file this project writes holds only tensors, numbers,
strings and plain containers, which `weights_only=True` reads.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from fewshot.errors import CheckpointError


def load_weights(path: str | Path, what: str = "a fewshot model or checkpoint file") -> Any:
    """`torch.load(path)` that only builds tensors and plain data: a file that asks for
    anything else, or a truncated or garbage one, is a `CheckpointError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused, it holds code or objects other than weights; "
                f"load only {what} that this project wrote"
            ) from None
        reason = "not a pickle of weights"
    # EOFError: an empty file (click would print only "Aborted."); the others: a truncated
    # or garbage archive; MemoryError: sizes in a forged header.
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, MemoryError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    raise CheckpointError(
        f"{path}: not a readable weights file ({reason}); it is truncated or corrupt, "
        f"use another copy of {what}"
    )


def remove_inside(path: str | Path, root: str | Path) -> None:
    """Delete the directory `path` if, resolved, it lies strictly inside `root`; refuse
    anything else (the root itself, a parent of it, a link out of it)."""
    path, root = Path(path), Path(root)
    if not path.exists() and not path.is_symlink():
        return
    target = path.resolve()
    if path.is_symlink() or root.resolve() not in target.parents:
        raise CheckpointError(
            f"refusing to delete {path}: it resolves to {target}, which is not inside "
            f"{root}; nothing was deleted, check the name and the output directory"
        )
    shutil.rmtree(target, ignore_errors=True)
