"""`fewshot bench data`: memory per node with 1 and 2 workers, and sampler speed.

On a synthetic 84 px RGB store of 100,000 training images (1,000 classes of 100),
Ray actors stand in for training workers: each gets the data exactly as a Ray Train
worker does (`share_datasets` on the driver, `shared_datasets` in the worker) and
reads every byte of it once, as an epoch would. After each step the node's memory is
measured two ways, both relative to a baseline taken with the actors started but
holding nothing:

- used: MemTotal - MemAvailable (/proc/meminfo), what the machine has given out; it
  includes anything else running on the machine, so it is noisy on a shared one;
- PSS: the proportional set size summed over this process and all its descendants
  (Ray's daemons and workers). A page shared by k processes counts 1/k in each, so
  the shared copy counts once, where RSS would count it once per process.

For contrast, the same two actors then each load their own copy, as every worker
did before the data was shared. Sampler speed is 5-way 1-shot 15-query episodes at
84 px, built in one worker from the shared data.

`--nodes N` measures the same across a real cluster of N worker nodes on this machine
(`LocalCluster`: `ray start` processes, each node its own raylet and object store), the
driver on a head that trains nothing. Per worker node, with 1 and then 2 holders there:
the bytes in its object store (its raylet's statistics) and the PSS of its processes
(its `ray start` tree: raylet, agents, workers), above the node's baseline.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewshot.bench import machine, table
from fewshot.config import Config, load_config
from fewshot.data.sources import synthetic
from fewshot.ray_cluster import LocalCluster, NodeSpec, store_bytes
from fewshot.train.distributed import share_datasets

SCRIPTS, CLASSES_PER_SCRIPT = 100, 10  # 1,000 training classes
ACROSS_NODES = "## Across nodes"


def used_bytes() -> int:
    """MemTotal - MemAvailable of this machine."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def pss_bytes(pids: list[int] | None = None) -> int:
    """PSS summed over `pids`, by default this process and its descendants (Ray's
    daemons, workers)."""
    if pids is None:
        me = psutil.Process()
        pids = [me.pid, *(p.pid for p in me.children(recursive=True))]
    total = 0
    for pid in pids:
        # A worker may exit between the listing and the read.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += psutil.Process(pid).memory_full_info().pss
    return total


def measure(timeout: float = 20.0) -> tuple[int, int]:
    """(used, PSS) once PSS has stopped moving: Ray frees a released object a moment
    after its last ref goes, and a baseline taken before that would be too high."""
    gc.collect()
    last, deadline = pss_bytes(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = pss_bytes()
        if abs(now - last) < 10e6:
            break
        last = now
    return used_bytes(), now


def bench_config(store: Path, decode: str) -> Config:
    return load_config(
        None,
        [
            f"data.path={store}",
            "data.image_size=84",
            "data.val_split=null",
            f"data.decode={decode}",
            "episode.n_way=5",
            "episode.k_shot=1",
            "episode.q_query=15",
        ],
    )


def holder_class():
    """A Ray actor that holds the data as a training worker does."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> None:
            import fewshot.train.distributed  # noqa: F401  (imports count in the baseline)

        # Imports inside the actor's methods: they run in the actor, after its baseline.
        def hold_shared(self, loop_config: dict) -> None:
            from fewshot.train.distributed import shared_datasets  # in the actor (above)

            self.data = shared_datasets(loop_config)
            self.touch()

        def load_own(self, config: Config) -> None:
            from fewshot.train.datasets import Datasets  # in the actor (above)

            self.data = Datasets.load(config)
            self.touch()

        def touch(self) -> None:
            """Read every byte once, as an epoch does: shared pages count once mapped."""
            images = self.data.train.images
            array = images.blobs if self.data.train.encoded else images.numpy()
            step = 1 << 26
            flat = array.reshape(-1)
            for start in range(0, len(flat), step):
                int(flat[start : start + step].sum())

        def episodes_per_s(self, config: Config, seconds: float) -> float:
            from fewshot.data.episodes import EpisodeSampler  # in the actor (above)
            from fewshot.streams import Stream  # in the actor (above)

            e = config.episode
            sampler = EpisodeSampler(self.data.train, e.n_way, e.k_shot, e.q_query)
            sampler.episode(Stream.TRAIN, 0, 0)  # warm-up: starts the decoding threads
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                sampler.episode(Stream.TRAIN, 0, count + 1)
                count += 1
            return count / (time.perf_counter() - started)

        def drop(self) -> None:
            self.data = None
            gc.collect()

    return Holder


def mb(value: float) -> str:
    return f"{value / 1e6:,.0f}"


def run(workdir: Path, out: Path, images_per_class: int = 100, seconds: float = 10.0) -> None:
    import ray

    store = prepare_store(workdir, images_per_class)
    images = SCRIPTS * CLASSES_PER_SCRIPT * images_per_class
    decoded = images * 3 * 84 * 84
    encoded = encoded_bytes(store)
    ray.init(include_dashboard=False, num_cpus=2)
    try:
        holders = [holder_class().remote() for _ in range(2)]
        ray.get([h.ready.remote() for h in holders])
        memory_rows, speed_rows = [], []

        def row(setting: str, held_by: str, base: tuple[int, int], copy: int) -> None:
            used, pss = (now - before for now, before in zip(measure(), base, strict=True))
            memory_rows.append([setting, held_by, mb(used), mb(pss), f"{pss / copy:.2f}"])

        # Episode mode first: the object store keeps (and reuses) the pages of a freed
        # object, so a small object put after a large one would not show.
        for mode, copy in (("episode", encoded), ("memory", decoded)):
            config = bench_config(store, mode)
            base = measure()
            loop_config = {"data": share_datasets(config)}
            label = f"shared, decode={mode}"
            row(label, "object store only", base, copy)
            ray.get(holders[0].hold_shared.remote(loop_config))
            row(label, "1 worker", base, copy)
            ray.get(holders[1].hold_shared.remote(loop_config))
            row(label, "2 workers", base, copy)
            speed = ray.get(holders[0].episodes_per_s.remote(config, seconds))
            speed_rows.append([f"decode={mode}", f"{speed:.0f}"])
            ray.get([h.drop.remote() for h in holders])
            del loop_config
        config = bench_config(store, "memory")
        base = measure()
        for count, holder in enumerate(holders, 1):
            ray.get(holder.load_own.remote(config))
            row("own copy per worker (before)", f"{count} worker(s)", base, decoded)
    finally:
        ray.shutdown()
    write(out, images, decoded, encoded, memory_rows, speed_rows, seconds)


def prepare_store(workdir: Path, images_per_class: int) -> Path:
    store = workdir / f"synthetic-rgb84-{images_per_class}"
    synthetic.prepare(
        store,
        groups=(SCRIPTS, 1, 1),
        classes_per_group=CLASSES_PER_SCRIPT,
        images_per_class=images_per_class,
        canvas=84,
        rgb=True,
    )
    return store


def run_nodes(workdir: Path, out: Path, nodes: int, images_per_class: int) -> None:
    """The per-node table across `nodes` worker nodes: section `## Across nodes` of `out`."""
    import ray

    store = prepare_store(workdir, images_per_class)
    decoded = SCRIPTS * CLASSES_PER_SCRIPT * images_per_class * 3 * 84 * 84
    names = [f"node_{chr(ord('a') + i)}" for i in range(nodes)]
    object_store_mb = int(2 * decoded / 2**20) + 100  # the copy fits, with room to spare
    specs = [NodeSpec(name, cpus=1, object_store_mb=object_store_mb) for name in names]
    cluster = LocalCluster(specs, head_object_store_mb=object_store_mb).start()
    try:
        holders = {
            name: [
                holder_class().options(num_cpus=0.5, resources={name: 0.5}).remote()
                for _ in range(2)
            ]
            for name in names
        }
        ray.get([h.ready.remote() for pair in holders.values() for h in pair])
        time.sleep(2)
        base = {name: pss_bytes(cluster.pids(name)) for name in names}
        loop_config = {"data": share_datasets(bench_config(store, "memory"))}
        rows = []
        for count in (1, 2):
            ray.get([holders[name][count - 1].hold_shared.remote(loop_config) for name in names])
            for name in names:
                stored = store_bytes(cluster.node_id(name))
                pss = pss_bytes(cluster.pids(name)) - base[name]
                rows.append([name, count, mb(stored), mb(pss), f"{pss / decoded:.2f}"])
    finally:
        cluster.stop()
    section = [
        ACROSS_NODES,
        "",
        f"A cluster of {nodes} worker nodes started on this machine (`LocalCluster`: `ray "
        "start` per node, each with its own raylet and object store, 1 CPU each; the "
        "driver on a head that trains nothing), the data decoded "
        f"(data.decode=memory), one copy {mb(decoded)} MB ({images_per_class} images per "
        "class). The driver puts the data once, in the head's store; each holder (a Ray "
        "actor that gets the data as a training worker does and reads every byte) is "
        "pinned to its node by the node's custom resource. Per worker node: *object "
        "store MB* from its raylet's own statistics; *PSS MB* summed over the node's "
        "processes (its `ray start` tree: raylet, agents, workers) above the node's "
        f"baseline with its idle holders started. Machine: {machine()}. Goal: under 1.3x "
        "one copy per node with 2 workers there.",
        "",
        *table(["node", "workers there", "object store MB", "PSS MB", "x one copy"], rows),
        "",
        "Each node pulls one copy from the head the first time one of its workers asks, "
        "and the second worker of a node maps that copy: compare a node's rows with 1 and "
        "2 workers. Whatever PSS holds above one copy is there with the first worker "
        "already and does not grow with the second; this bench does not break it down.",
        "",
    ]
    text = out.read_text() if out.is_file() else "# Data shared per node\n"
    text = text.split(ACROSS_NODES)[0].rstrip("\n") + "\n\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n".join(section))


def encoded_bytes(store: Path) -> int:
    """Bytes of the train split's PNGs plus their (start, end) spans: one encoded copy."""
    total = 0
    for part in (store / "split=train").glob("*.parquet"):
        column = pq.read_table(part, columns=["image"]).column("image")
        total += pc.sum(pc.binary_length(column)).as_py() + 16 * len(column)
    pa.default_memory_pool().release_unused()  # else the baseline holds what Arrow kept
    return total


def write(out: Path, images: int, decoded: int, encoded: int, memory_rows, speed_rows, seconds):
    lines = [
        "# Data shared per node",
        "",
        f"Synthetic store: {images:,} training images of 1,000 classes, 84x84 RGB PNG: one "
        f"copy is {mb(decoded)} MB decoded (data.decode=memory) or {mb(encoded)} MB encoded "
        f"(data.decode=episode). Machine: {machine()}, "
        f"{psutil.virtual_memory().total / 1e9:.0f} GB memory, shared with other work "
        "(another engineer's training runs).",
        "",
        "## Memory of the node",
        "",
        "MB above a baseline taken with two idle Ray workers started, after each worker "
        "has read every byte of the data once (as an epoch does). *used*: MemTotal - "
        "MemAvailable, everything on the machine, so noisy here. *PSS*: proportional set "
        "size summed over the driver, Ray's daemons and the workers; a page shared by k "
        "processes counts 1/k in each, so the shared copy counts once (RSS would count it "
        "per process). *x one copy*: PSS over the size of one copy of the data as held. "
        "Goal: 2 workers under 1.3x one copy.",
        "",
        *table(["data", "held by", "used MB", "PSS MB", "x one copy"], memory_rows),
        "",
        "On one machine the driver's put is the node's copy; on a cluster the driver's "
        "node keeps it and every other node pulls one copy the first time one of its "
        "workers asks. With `own copy per worker` (how workers held data before), each "
        "worker decodes its own: memory grows by a copy per worker. With decode=episode "
        "one copy is only the PNG bytes, so fixed costs weigh more in its ratio: the "
        "driver's leftovers from reading the Parquet files, and per worker its label "
        "index, sampler table and decoding threads; a second worker adds a few MB, not "
        "a copy.",
        "",
        "## Sampler speed",
        "",
        f"5-way 1-shot 15-query episodes at 84 px (80 images each), built and normalised in "
        f"one Ray worker (1 CPU) from the shared data, for {seconds:.0f} s. decode=episode "
        "decodes each episode's 80 PNGs through a pool of up to 4 threads; the CPUs were "
        "shared with other work, so these are lower bounds.",
        "",
        *table(["mode", "episodes/s"], speed_rows),
        "",
    ]
    if out.is_file() and ACROSS_NODES in out.read_text():  # `--nodes`' section stays
        lines.append(ACROSS_NODES + out.read_text().split(ACROSS_NODES, 1)[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
