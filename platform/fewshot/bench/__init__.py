"""Benchmarks: `fewshot bench ...` measures and writes benchmarks/results/*.md."""

from __future__ import annotations

import os
import platform as stdlib_platform
from pathlib import Path


def machine() -> str:
    """One line naming what the figures were measured on."""
    import torch

    cpu = stdlib_platform.processor() or stdlib_platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({cpu}), {gpu}, torch {torch.__version__}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table, one line each."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_table(path: Path, title: str, intro: str, header: list[str], rows: list[list]) -> None:
    lines = [f"# {title}", "", intro, "", *table(header, rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
