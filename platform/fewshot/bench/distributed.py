"""`fewshot bench distributed`: the bare loop vs the same loop under Ray Train.

Episodes per second of training (the meta-batch's episodes, over all workers),
measured inside the loop from the end of one evaluation round to the start of
the next, so start-up is reported separately. Same episode shape, backbone and
steps for every row; the data is the built-in synthetic set at 28 px.
"""

from __future__ import annotations

import time
from pathlib import Path

from fewshot.bench import machine, write_table
from fewshot.config import Config, load_config
from fewshot.data.sources import synthetic
from fewshot.train.distributed import fit_on_ray
from fewshot.train.loop import Worker, fit


def bench_config(workdir: Path, steps: int, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.path={workdir / 'synthetic'}",
            f"train.output_dir={workdir / 'runs'}",
            "data.val_split=val",
            "episode.n_way=5",
            "episode.k_shot=1",
            "episode.q_query=15",
            "episode.meta_batch=4",
            f"train.steps={steps}",
            f"train.eval_every={steps // 2}",
            "train.val_episodes=10",
            "tracking.enabled=false",
            *extra,
        ],
    )


def bare(config: Config) -> float:
    """Training episodes/s of the loop in this process (last round)."""
    worker = Worker(config)
    rounds: list[float] = []
    fit(
        worker,
        lambda step, metrics: None,
        lambda w, metrics: rounds.append(metrics["train_episodes_per_s"]),
    )
    return rounds[-1]


def on_ray(config: Config) -> tuple[float, float]:
    """(training episodes/s of the last round, wall seconds including start-up)."""
    started = time.perf_counter()
    _, metrics = fit_on_ray(config, None, restart=True)
    return metrics["train_episodes_per_s"], time.perf_counter() - started


def run(workdir: Path, out: Path, steps: int = 200) -> list[list]:
    synthetic.prepare(workdir / "synthetic")
    rows = []
    for threads in (1, 2):
        config = bench_config(workdir, steps, f"train.threads={threads}")
        rows.append([f"bare loop, 1 process, {threads} thread(s)", f"{bare(config):.1f}", "-"])
    for workers, cpus in ((1, 1), (1, 2), (2, 1)):
        config = bench_config(
            workdir,
            steps,
            f"distributed.workers={workers}",
            f"distributed.cpus_per_worker={cpus}",
            f"train.threads={cpus}",
            f"name=bench-{workers}x{cpus}",
        )
        speed, wall = on_ray(config)
        rows.append(
            [f"Ray Train, {workers} worker(s) x {cpus} CPU(s)", f"{speed:.1f}", f"{wall:.0f}"]
        )
    write_table(
        out,
        "Distributed training throughput",
        f"ProtoNet conv4, 28x28 synthetic glyphs, 5-way 1-shot 15-query, meta-batch 4, "
        f"{steps} steps; training episodes/s of the second half (after warm-up), over all "
        f"workers. Machine: {machine()}.",
        ["setting", "train episodes/s", "wall s incl. start-up"],
        rows,
    )
    return rows
