"""The hooks of `fit` for the worker that logs (this process, or rank 0 of a Ray run):
progress on the terminal or in a log, metrics and run facts into MLflow."""

from __future__ import annotations

import json
import sys

from fewshot.tracking import Tracker
from fewshot.train.budget import PLANNED, USED
from fewshot.train.loop import Worker


class Progress:
    """Training progress: a rich bar on a terminal; elsewhere (a log file, a Ray job's
    output) one plain line every 5% of the steps. Silent when not `enabled`."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        self.total, self.every = total, max(1, total // 20)
        self.next_line = start + 1  # the first update prints, then every 5%
        if enabled and not self.lines:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=total, completed=start, status="")
            self.bar.start()

    def plan(self, total: int) -> None:
        """Count to `total` steps: a budgeted run's plan (train/budget.py)."""
        self.total, self.every = total, max(1, total // 20)
        if self.bar:
            self.bar.update(self.task, total=total)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        hidden = {"train_lr", PLANNED, USED}  # the budget's are printed on their own
        shown = {k: v for k, v in metrics.items() if k not in hidden and v == v}  # v == v: not NaN
        status = " ".join(f"{k} {v:.3f}" for k, v in shown.items())
        if self.bar:
            self.bar.update(self.task, completed=step, status=status)
        elif self.lines and (step >= self.next_line or step == self.total):
            print(f"train {step}/{self.total} {status}", file=sys.stderr, flush=True)
            self.next_line = (step // self.every + 1) * self.every

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


class RoundLogger:
    """The hooks of `fit` for a worker that logs (this process, or rank 0)."""

    def __init__(self, tracker: Tracker, progress: Progress | None = None) -> None:
        self.tracker, self.progress = tracker, progress
        self.last: dict[str, float] = {"val_acc": float("nan")}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.metrics(metrics, step)
        if self.progress and PLANNED in metrics:
            self.progress.plan(int(metrics[PLANNED]))
        if self.progress:
            self.progress.update(step, {**metrics, **self.last})

    def round(self, worker: Worker, metrics: dict[str, float]) -> None:
        """A validation round's metrics; `last` keeps them with the step they were taken
        at (the run's last step once it ends, as Ray Train's report has it)."""
        self.last.update({**metrics, "step": worker.step})
        self.tracker.metrics(metrics, worker.step)


def log_runtime(tracker: Tracker, worker: Worker) -> None:
    """Say how this run computes (runtime.py): one line on stderr, and the choice as the
    run's `runtime.*` params. A run resumed elsewhere keeps its first machine's params
    and records the new choice as the tag `fewshot.runtime_on_resume`."""
    print(worker.runtime.line(), file=sys.stderr, flush=True)
    if worker.step == 0:
        tracker.params(worker.runtime.params())
    else:
        tracker.tags({"fewshot.runtime_on_resume": worker.runtime.line()})


def log_train_classes(tracker: Tracker, worker: Worker) -> None:
    """With data.train_classes (few base classes, e.g. miniImageNet-S), log which classes
    the run trains on: train_classes.json, a list of class names."""
    if worker.config.data.train_classes:
        tracker.text(json.dumps(worker.train_images.class_names, indent=2), "train_classes.json")
