"""`fewshot bench speed`: training throughput against the peers, on one machine, in one run.

Every contender trains conv4 on the same Omniglot split with the same episode size
(20-way 1-shot 5 queries, 28x28 by default), the same thread count and the same
number of episodes:

- our ProtoNet (what `auto` picks on this machine, and fp32 where that differs) against
  easyfsl's `PrototypicalNetworks` with its `TaskSampler` and a DataLoader, as its
  README trains it. easyfsl 1.5.0 calls `Sampler.__init__(data_source=None)`, which
  torch 2.14 refuses; `easyfsl_sampler_shim` gives `Sampler.__init__` a signature that
  ignores the argument, for the benchmark only;
- our MAML against learn2learn's MAML. learn2learn 0.2.0 does not build on Python 3.11,
  so its clone/adapt loop is re-implemented faithfully here (`L2LStyleMAML`: a deep
  copy whose parameters are replaced by non-leaf tensors, updated in place by
  `autograd.grad` with `create_graph=True`);
- our sampler alone and the conversion of the zips (images/s);
- the loop's overhead: our training step against the bare method (the same loss,
  backward and Adam step on one pre-made episode, no sampler or loop).
Accuracy at equal training: ours and easyfsl's models, after the same episodes, are
tested on the same fixed test episodes.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fewshot.bench import machine, write_table
from fewshot.config import Config, load_config
from fewshot.data.decode import normalise
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import ImageSet, load_split
from fewshot.data.sources import omniglot
from fewshot.evaluate import Accuracy, episode_accuracies, mean_ci
from fewshot.methods import build_method
from fewshot.models.backbones import build_backbone
from fewshot.runtime import Runtime
from fewshot.streams import Stream
from fewshot.train.loop import Worker


def per_second(step: Callable[[], object], count: int, warmup: int = 3) -> float:
    """Calls of `step` per second over `count` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(count):
        step()
    return count / (time.perf_counter() - started)


def bench_config(store: Path, method: str, n_way: int, size: int, threads: int, *execution):
    """The benchmark's config for `method`; `execution` pins train.precision and friends
    (none: what `auto` picks on this machine)."""
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.train_split=small1",
            "data.val_split=null",
            "data.test_split=small2",
            f"data.image_size={size}",
            f"method.name={method}",
            f"episode.n_way={n_way}",
            "episode.k_shot=1",
            "episode.q_query=5",
            "episode.meta_batch=1",
            f"train.threads={threads}",
            # ProtoNet at the temperature of the Omniglot recipe (benchmarks/results/omniglot.md)
            "method.inner_steps=1" if method == "maml" else "method.temperature=8.0",
            *execution,
        ],
    )


def ours(config: Config, episodes: int) -> tuple[float, Worker]:
    """Training episodes/s of our loop (sampler, step, all-reduce hook, optimiser)."""
    worker = Worker(config)
    return per_second(worker.train_step, episodes), worker


def bare(config: Config, episodes: int) -> tuple[float, int]:
    """(episodes/s of the method alone: loss, backward and Adam on one pre-made episode,
    floating-point operations of one such step as torch's FLOP counter counts them)."""
    worker = Worker(config)
    episode = worker.to_device(worker.sampler.episode(Stream.TRAIN, 0, 0))
    method, optimizer = worker.method, worker.optimizer
    method.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with worker.autocast():
            loss = method.loss(episode)
        loss.total.backward()
        optimizer.step()

    speed = per_second(step, episodes)
    with FlopCounterMode(display=False) as counter:
        step()
    return speed, counter.get_total_flops()


PEAK_SIZE = 2048


def peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of the fastest of the square matrix products run in `seconds` (at least 5,
    after a warm-up one) in `dtype`: the machine's practical peak in that precision,
    which a step's FLOP/s are measured against (a GEMM this large runs at the best speed
    the CPU's vector units or AMX tiles reach; the fastest of many is the least disturbed
    by other work on the host)."""
    size = PEAK_SIZE
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    (a @ b).sum().item()
    fastest, runs, started = float("inf"), 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        (a @ b).sum().item()
        fastest, runs = min(fastest, time.perf_counter() - begin), runs + 1
    return 2 * size**3 / fastest


class EpisodeDataset(torch.utils.data.Dataset):
    """Our decoded split as easyfsl reads a dataset: (image, label) items, `get_labels`."""

    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images.images[index : index + 1]
        return normalise(x, self.images.mean, self.images.std)[0], int(self.images.labels[index])

    def get_labels(self) -> list[int]:
        return self.images.labels.tolist()


def easyfsl_sampler_shim() -> None:
    """easyfsl 1.5.0's TaskSampler calls Sampler.__init__(data_source=None); torch 2.14's
    Sampler.__init__ takes no argument. Accept and ignore it (benchmark only)."""
    sampler = torch.utils.data.Sampler
    if not getattr(sampler, "_fewshot_shim", False):
        sampler.__init__ = lambda self, *args, **kwargs: None
        sampler._fewshot_shim = True


def easyfsl(config: Config, episodes: int) -> tuple[float, nn.Module] | None:
    """Training episodes/s of easyfsl's PrototypicalNetworks with its TaskSampler loop
    (fp32, its defaults), on our conv4; None when easyfsl is not installed."""
    try:
        from easyfsl.methods import PrototypicalNetworks
        from easyfsl.samplers import TaskSampler
    except ImportError:
        return None
    easyfsl_sampler_shim()

    torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    images = load_split(config.data.path, config.data.train_split, config.data.image_size)
    dataset = EpisodeDataset(images)
    e = config.episode
    sampler = TaskSampler(dataset, e.n_way, e.k_shot, e.q_query, n_tasks=episodes + 3)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=sampler.episodic_collate_fn
    )
    backbone = build_backbone(config.backbone.name, 1, config.backbone.width)
    model = PrototypicalNetworks(backbone)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    model.train()
    batches = iter(loader)

    def step() -> None:
        support_x, support_y, query_x, query_y, _ = next(batches)
        optimizer.zero_grad()
        model.process_support_set(support_x, support_y)
        loss = F.cross_entropy(model(query_x), query_y)
        loss.backward()
        optimizer.step()

    return per_second(step, episodes), model


class EasyFSLPredictor(nn.Module):
    """An easyfsl model behind our `predict` interface, to test it on our episodes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        self.model.process_support_set(support_x, support_y)
        return self.model(query_x)


def clone_module(module: nn.Module) -> nn.Module:
    """learn2learn's `clone_module`: a copy whose parameters are the originals cloned
    (non-leaf tensors, so gradients flow back to the originals)."""
    clone = copy.deepcopy(module)
    originals = dict(module.named_parameters())
    for name, sub in clone.named_modules():
        for key in list(sub._parameters):
            full = f"{name}.{key}" if name else key
            sub._parameters[key] = originals[full].clone()
    return clone


def update_module(module: nn.Module, updates: dict[str, torch.Tensor]) -> None:
    """learn2learn's `update_module`: p <- p + update, replacing the tensors in place."""
    for name, sub in module.named_modules():
        for key in list(sub._parameters):
            full = f"{name}.{key}" if name else key
            sub._parameters[key] = sub._parameters[key] + updates[full]


class L2LStyleMAML:
    """learn2learn's MAML loop: `learner = maml.clone(); learner.adapt(loss)`; the query
    loss of the adapted clone is back-propagated into the original."""

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False) -> None:
        self.model, self.lr, self.first_order = model, lr, first_order

    def adapt(self, learner: nn.Module, loss: torch.Tensor) -> None:
        names, params = zip(*learner.named_parameters(), strict=True)
        grads = torch.autograd.grad(loss, params, create_graph=not self.first_order)
        update_module(learner, {n: -self.lr * g for n, g in zip(names, grads, strict=True)})


def l2l_maml(config: Config, episodes: int) -> float:
    """Episodes/s of the learn2learn-style loop on our MAML's network (conv4 + linear
    head, batch statistics) and our sampler; fp32, as learn2learn trains (pass an fp32
    config). Built without our loop's runtime, as a learn2learn user would run it."""
    torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    images = load_split(config.data.path, config.data.train_split, config.data.image_size)
    e = config.episode
    sampler = EpisodeSampler(images, e.n_way, e.k_shot, e.q_query)
    network = build_method(config, 1).train()  # conv4 + linear head; forward(x) -> logits
    maml = L2LStyleMAML(network, lr=network.params.inner_lr)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.train.lr)
    steps = iter(range(10**9))

    def step() -> None:
        episode = sampler.episode(Stream.TRAIN, config.seed, next(steps))
        optimizer.zero_grad()
        learner = clone_module(network)
        for _ in range(network.params.inner_steps):
            maml.adapt(learner, F.cross_entropy(learner(episode.support_x), episode.support_y))
        F.cross_entropy(learner(episode.query_x), episode.query_y).backward()
        optimizer.step()

    return per_second(step, episodes)


def sampler_speed(config: Config, episodes: int) -> float:
    images = load_split(config.data.path, config.data.train_split, config.data.image_size)
    e = config.episode
    sampler = EpisodeSampler(images, e.n_way, e.k_shot, e.q_query)
    steps = iter(range(10**9))
    return per_second(lambda: sampler.episode(Stream.TRAIN, 0, next(steps)), episodes)


def conversion_speed(zips: list[Path]) -> float:
    """Images/s of `fewshot data prepare omniglot` from the zips to a fresh store."""
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        info = omniglot.prepare(zips, Path(scratch) / "omniglot")
        seconds = time.perf_counter() - started
    return sum(s["images"] for s in info["splits"].values()) / seconds


def accuracy_on_test(model, config: Config, episodes: int) -> Accuracy:
    images = load_split(config.data.path, config.data.test_split, config.data.image_size)
    e = config.episode
    sampler = EpisodeSampler(images, e.n_way, e.k_shot, e.q_query)
    runtime = Runtime.of(config.train)
    return mean_ci(
        episode_accuracies(model, sampler.fixed_episodes(episodes, 0, Stream.TEST), runtime)
    )


def run(
    out: Path,
    zips: list[Path],
    workdir: Path,
    episodes: int = 300,
    test_episodes: int = 300,
    threads: int = 2,
    n_way: int = 20,
    size: int = 28,
) -> list[dict]:
    """Measure every row and write `out` (markdown) and its JSON beside it."""
    store = workdir / "omniglot"
    convert = conversion_speed(zips)
    omniglot.prepare(zips, store)
    fp32 = ("train.precision=fp32",)
    configs = {
        (method, execution): bench_config(store, method, n_way, size, threads, *pinned)
        for method in ("protonet", "maml")
        for execution, pinned in (("auto", ()), ("fp32", fp32))
    }
    chosen = Worker(configs["protonet", "auto"]).runtime  # probes, and caches the answer
    executions = ["auto"] if chosen.execution.precision == "fp32" else ["auto", "fp32"]
    label = {"auto": f"auto = {chosen.execution}", "fp32": "fp32"}
    rows: list[dict] = []

    def add(name: str, value: float | None, unit: str, note: str = "", peak: str = "") -> None:
        rows.append({"name": name, "value": value, "unit": unit, "peak": peak, "note": note})

    add("machine", None, "", machine())
    add("chosen execution (train.precision/channels_last/threads: auto)", None, "", chosen.line())
    precision = {e: configs["protonet", e].train.precision for e in executions}
    precision["auto"] = chosen.execution.precision
    dtypes = {e: torch.bfloat16 if p == "bf16" else torch.float32 for e, p in precision.items()}
    # Measured before and after the contenders, the best kept: on a shared host the
    # matrix units' speed drifts by up to 2x within minutes.
    peaks = {e: peak_flops(chosen.device, dtypes[e]) for e in executions}
    add("sampler alone", sampler_speed(configs["protonet", "auto"], 20 * episodes), "episodes/s")
    add("conversion (omniglot zips -> store)", convert, "images/s")
    # The peers first: our runtime changes process-wide settings (keep_freed_memory) that
    # their users would not have.
    peer = easyfsl(configs["protonet", "fp32"], episodes)
    l2l = l2l_maml(configs["maml", "fp32"], episodes // 3)
    speeds, models = {}, {}
    shares = []  # (row, execution, FLOPs per episode): its % of peak, once the peak is known
    for execution in executions:
        config = configs["protonet", execution]
        speeds[execution], worker = ours(config, episodes)
        models[execution] = worker.method
        bare_speed, flops = bare(config, episodes)
        add(f"ours: ProtoNet, {label[execution]}", speeds[execution], "episodes/s")
        shares.append((rows[-1], execution, flops))
        overhead = 100 * (bare_speed / speeds[execution] - 1)
        add(
            f"bare ProtoNet step, {label[execution]}",
            bare_speed,
            "episodes/s",
            f"our loop's overhead {overhead:+.1f}% (target within 10%)",
        )
        shares.append((rows[-1], execution, flops))
    if peer is None:
        add("easyfsl PrototypicalNetworks", None, "episodes/s", "easyfsl not installed")
    else:
        ratios = ", ".join(f"{speeds[e] / peer[0]:.2f}x ({label[e]})" for e in executions)
        add(
            "easyfsl PrototypicalNetworks + TaskSampler, fp32",
            peer[0],
            "episodes/s",
            f"ours is {ratios}",
        )
    for execution in executions:
        maml = ours(configs["maml", execution], episodes // 3)[0]
        add(
            f"ours: MAML (2nd order, 1 inner step), {label[execution]}",
            maml,
            "episodes/s",
            f"{maml / l2l:.2f}x the learn2learn-style loop",
        )
    add(
        "learn2learn-style MAML (clone/adapt), fp32",
        l2l,
        "episodes/s",
        "learn2learn 0.2.0 does not build on Python 3.11: faithful re-implementation",
    )
    for e in executions:
        peaks[e] = max(peaks[e], peak_flops(chosen.device, dtypes[e]))
        add(
            f"peak: {PEAK_SIZE}x{PEAK_SIZE} matrix product, {precision[e]}",
            peaks[e] / 1e9,
            "GFLOP/s",
            f"the best before and after the contenders; the reference for the {precision[e]} rows",
        )
    for row, execution, flops in shares:
        row["peak"] = f"{100 * row['value'] * flops / peaks[execution]:.1f}%"
        row["note"] = f"{flops / 1e9:.2f} GFLOP/episode; {row['note']}".rstrip("; ")
    accuracy = {
        f"ours, {label[e]}": accuracy_on_test(models[e], configs["protonet", e], test_episodes)
        for e in executions
    }
    if peer is not None:
        accuracy["easyfsl"] = accuracy_on_test(
            EasyFSLPredictor(peer[1]), configs["protonet", "fp32"], test_episodes
        )
    write(out, rows, accuracy, episodes, n_way, size, threads)
    return rows


def write(out: Path, rows, accuracy, episodes, n_way, size, threads) -> None:
    table = [
        [
            r["name"],
            "-" if r["value"] is None else f"{r['value']:.1f}",
            r["unit"],
            r["peak"],
            r["note"],
        ]
        for r in rows
    ]
    write_table(
        out,
        "Training speed against the peers",
        f"conv4, {n_way}-way 1-shot 5 queries, {size}x{size} Omniglot (small1), "
        f"{threads} threads, {episodes} timed training episodes per contender (MAML: a "
        f"third), after 3 warm-up ones; the same machine in one run. The peers run first, "
        "with glibc's default allocator; ours then keeps freed memory (runtime.py). "
        "% of peak: the step's FLOPs (torch's FLOP counter, forward and backward) times "
        "episodes/s, over the FLOP/s of a large matrix product in the same precision "
        f"measured in the same run. Machine: {machine()}.",
        ["contender", "speed", "unit", "% of peak", "note"],
        table,
    )
    lines = [
        "",
        f"## Accuracy after the same {episodes} training episodes",
        "",
        f"Tested on the same fixed {n_way}-way 1-shot episodes of small2 (other alphabets).",
        "",
        "| model | accuracy % ± 95% CI |",
        "|---|---|",
        *[f"| {name} | {100 * a.mean:.2f} ± {100 * a.ci95:.2f} |" for name, a in accuracy.items()],
    ]
    with out.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    rows_json = {"rows": rows, "accuracy": {k: [a.mean, a.ci95] for k, a in accuracy.items()}}
    out.with_suffix(".json").write_text(json.dumps(rows_json, indent=1) + "\n")
