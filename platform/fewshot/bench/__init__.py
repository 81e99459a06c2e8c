"""Benchmarks: `fewshot bench ...` measures and writes benchmarks/results/*.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fewshot.evaluate import Accuracy
from fewshot.runtime import cpu_name, cpu_native_bf16


def machine() -> str:
    """One line naming what the figures were measured on: the processor, what it can
    compute (torch's CPU capability, native bf16 or not), the GPU and torch."""
    bf16 = "native bf16" if cpu_native_bf16() else "no native bf16"
    cpu = f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {bf16}"
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


def write_results(out: Path, results: list[dict]) -> None:
    """The rows as JSON beside the table, so `--only` can redo some rows and keep the rest."""
    rows = [
        {**r, "accuracy": {t: [a.mean, a.ci95, a.episodes] for t, a in r["accuracy"].items()}}
        for r in results
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def read_results(out: Path) -> list[dict]:
    path = out.with_suffix(".json")
    if not path.is_file():
        return []
    return [
        {**r, "accuracy": {t: Accuracy(*a) for t, a in r["accuracy"].items()}}
        for r in json.loads(path.read_text())
    ]
