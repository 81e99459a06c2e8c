"""Two rules, each with one home: weights are loaded without running code from the file,
and a directory is deleted only from inside the root it belongs to.

A `.pt` file is a pickle: loaded without torch's weights-only unpickler, any file (a
run, a registered model's artifact, a Ray checkpoint on shared storage) could run code
in the process that opens it. Every file this project writes holds only tensors, numbers,
strings and plain containers, which `weights_only=True` reads.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fewshot.errors import CheckpointError

# The global a refused pickle asks for, as torch names it: "Unsupported global: GLOBAL
# io.open was not an allowed global" or (torch 2.6+, a blocked module) "unsupported GLOBAL
# posix.system whose module posix is blocked". A dotted name only: a text file whose first
# byte is "c" (the GLOBAL opcode) makes torch report the rest of its line as a "global".
GLOBAL = re.compile(r"GLOBAL ((?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*)\s")
ANOTHER_COPY = "check the path or use another copy"


def load_weights(
    path: str | Path,
    what: str = "a fewshot model or checkpoint file",
    fix: str = ANOTHER_COPY,
) -> Any:
    """`torch.load(path)` that only builds tensors and plain data: a file that asks for
    anything else, or a truncated, garbage or other kind of file, is a one-line
    `CheckpointError` naming it, saying it is not `what`, then `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = GLOBAL.search(str(exc))
        if code:
            raise CheckpointError(
                f"{path}: refused, it asks to run code that is not allowed ({code[1]}); "
                f"load only {what} that this project wrote"
            ) from None
        reason = "not a pickle of weights"
    # Unpickling bytes that are not a pickle of weights raises whatever the unpickler
    # trips on (KeyError for a text file, IndexError, UnicodeDecodeError, EOFError for an
    # empty file, RuntimeError for a broken archive, MemoryError for forged sizes...):
    # each means the same to the user.
    except Exception as exc:
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    raise unreadable(path, what, reason, fix)


def unreadable(
    path: str | Path, what: str, reason: str, fix: str = ANOTHER_COPY
) -> CheckpointError:
    """The one line for a file that is not `what`."""
    return CheckpointError(
        f"{path}: not {what}, it is truncated, corrupt or of another kind ({reason}); {fix}"
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
