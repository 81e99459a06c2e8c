"""`fewshot bench gpu`: training episodes/s on one GPU, ProtoNet on ResNet-12 at 84 px,
5-way 1-shot 15 queries, one task per step.

Rows:
- our loop: `Worker.train_step`, everything a real step does (host sampling, pinned
  copies, loss, backward, all-reduce bookkeeping, optimiser step);
- bare compute: the same loss, backward and optimiser step on one episode made once
  and kept on the GPU, the ceiling for any loop on this card;
  both in fp32 and in bf16 autocast plus channels_last (where the card has native bf16);
- easyfsl's loop (its TaskSampler, DataLoader and PrototypicalNetworks around our
  ResNet-12), fp32 as it is written, when easyfsl is installed.
The images are random (content does not change speed): 64 classes of 20 RGB images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fewshot.bench import machine, write_table
from fewshot.config import Config, load_config
from fewshot.data.reader import ImageSet
from fewshot.errors import FewShotError
from fewshot.runtime import bf16_on_gpu
from fewshot.streams import Stream
from fewshot.train.datasets import Datasets
from fewshot.train.loop import Worker

SHAPE = ["episode.n_way=5", "episode.k_shot=1", "episode.q_query=15", "episode.meta_batch=1"]


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise FewShotError(
            "fewshot bench gpu: no CUDA GPU is visible to torch; run it on a GPU machine"
        )


def random_images(classes: int = 64, per_class: int = 20, size: int = 84) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 3, size, size), generator=generator)
    return ImageSet(
        images=images.to(torch.uint8),
        labels=torch.arange(classes).repeat_interleave(per_class),
        class_names=[str(c) for c in range(classes)],
        class_groups=["all"] * classes,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )


def bench_config(*extra: str) -> Config:
    return load_config(
        None,
        [
            "backbone.name=resnet12",
            "data.image_size=84",
            *SHAPE,
            "method.name=protonet",
            "train.device=cuda",
            "train.schedule=constant",
            "tracking.enabled=false",
            *extra,
        ],
    )


def per_second(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Calls of `step` per second after `warmup` calls (cuDNN autotuning, allocator)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - started)


def loop_speed(config: Config, images: ImageSet, steps: int, warmup: int) -> float:
    worker = Worker(config, data=Datasets(images, None))
    return per_second(worker.train_step, steps, warmup, worker.device)


def bare_speed(config: Config, images: ImageSet, steps: int, warmup: int) -> float:
    worker = Worker(config, data=Datasets(images, None))
    episode = worker.to_device(worker.sampler.episode(Stream.TRAIN, config.seed, 0))

    def step() -> None:
        worker.optimizer.zero_grad(set_to_none=True)
        with worker.autocast():
            loss = worker.method.loss(episode)
        loss.total.backward()
        worker.optimizer.step()

    return per_second(step, steps, warmup, worker.device)


def easyfsl_speed(config: Config, images: ImageSet, steps: int, warmup: int) -> float | None:
    """easyfsl's episodic loop with our backbone, or None when easyfsl is not installed."""
    try:
        from easyfsl.methods import PrototypicalNetworks
        from easyfsl.samplers import TaskSampler
    except ImportError:
        return None
    from torch.utils.data import DataLoader, Dataset, Sampler

    class Images(Dataset):
        def __len__(self) -> int:
            return len(images.labels)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            x = (images.images[i].float() / 255 - 0.5) / 0.25
            return x, int(images.labels[i])

        def get_labels(self) -> list[int]:
            return images.labels.tolist()

    e = config.episode
    # easyfsl 1.5.0 calls Sampler.__init__(data_source=None), which torch 2.14 refuses;
    # the base __init__ does nothing else, so skip it while the sampler is built.
    original, Sampler.__init__ = Sampler.__init__, lambda self, *args, **kwargs: None
    try:
        sampler = TaskSampler(Images(), e.n_way, e.k_shot, e.q_query, n_tasks=warmup + steps)
    finally:
        Sampler.__init__ = original
    worker = Worker(config, data=Datasets(images, None))  # our ResNet-12, same init
    loader = DataLoader(
        Images(),
        batch_sampler=sampler,
        collate_fn=sampler.episodic_collate_fn,
        pin_memory=worker.device.type == "cuda",
    )
    model = PrototypicalNetworks(worker.method.backbone).to(worker.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    tasks = iter(loader)

    def step() -> None:  # easyfsl's documented training step
        support_x, support_y, query_x, query_y, _ = next(tasks)
        optimizer.zero_grad()
        model.process_support_set(support_x.to(worker.device), support_y.to(worker.device))
        scores = model(query_x.to(worker.device))
        F.cross_entropy(scores, query_y.to(worker.device)).backward()
        optimizer.step()

    return per_second(step, steps, warmup, worker.device)


def run(out: Path, steps: int = 200, warmup: int = 20) -> list[list]:
    require_gpu()
    images = random_images()
    fp32 = bench_config("train.precision=fp32")
    settings = [("fp32", fp32)]
    if bf16_on_gpu():
        fast = bench_config("train.precision=bf16", "train.channels_last=true")
        settings.append(("bf16 + channels_last", fast))
    rows = []
    for name, config in settings:
        rows.append([f"our loop, {name}", f"{loop_speed(config, images, steps, warmup):.1f}"])
        rows.append([f"bare compute, {name}", f"{bare_speed(config, images, steps, warmup):.1f}"])
    easyfsl = easyfsl_speed(fp32, images, steps, warmup)
    rows.append(["easyfsl loop, fp32", "not installed" if easyfsl is None else f"{easyfsl:.1f}"])
    write_table(
        out,
        "GPU throughput",
        f"ProtoNet on ResNet-12, 84x84 RGB, 5-way 1-shot 15-query, one task per step, "
        f"{steps} steps after {warmup} warm-up steps; training episodes/s. fp32 rows use "
        f"torch's defaults (TF32 for cuDNN convolutions). easyfsl 1.5.0 runs with a "
        f"`Sampler.__init__` shim for torch 2.14. Machine: {machine()}.",
        ["setting", "train episodes/s"],
        rows,
    )
    return rows
