"""Where and how tensors are computed: device, precision, memory format and threads,
chosen for the hardware the process lands on.

`train.precision`, `train.channels_last` and `train.threads` default to `auto`:

- precision: bf16 autocast where the device computes bf16 natively (`native_bf16`): a
  GPU from Ampere on, or a CPU whose oneDNN has bf16 instructions (AMX or
  AVX512-BF16); there it is about twice as fast as fp32 for conv4 (Intel Xeon with
  AMX). Elsewhere bf16 is emulated: on an AVX2-only CPU a bf16 convolution runs 7 to
  8 times slower than fp32, so `auto` is fp32 there, and an explicit `bf16` is refused
  unless `train.allow_slow_precision` says it is meant.
- memory format: NCHW and channels_last are both candidates; which is faster depends
  on the processor, the backbone and the episode's shape.
- threads: the CPUs this process is given (a Ray worker's CPU allotment, else the
  CPUs it may run on), not torch's default. Several processes on one node each
  spinning OpenMP threads for every core slow each other down. An explicit count above
  the CPUs the process may run on is refused (`check_threads`). The count is a
  process-wide setting, so choosing a runtime leaves it alone: whoever owns the process
  applies it (`Runtime.apply`: a training worker, a server), while a model loaded into
  someone else's process computes with that process's threads.

With more than one candidate and a `Probe` (a training step of the run's own episode
shape), a few timed steps of each decide, and the result is cached per machine and
shape (`cache_path()`), so a second run pays nothing. Without a probe (evaluation, a
benchmark's fixed setting) the rule is channels_last.

A probe timed while other work ran is slowed 2 to 7 times (two OpenMP threads on two
cores wait for each other at every operation), and its answer would stay in the cache
for every later run. So the cache keeps an answer only while runs confirm it
(`confirm_cache`): once a run has timed its first training steps (train/budget.py: the
fastest of 3 windows of 10 steps), it compares its speed in episodes (tasks) per second
with the probe's for the execution it trains with. A run `CONTENDED_PROBE` (1.5) times
faster than the probe said means the probe was slowed by other work: the entry is
dropped, and the next run probes again. A run slower than the probe says nothing about
the probe (the run may be the one slowed, and a training step also samples episodes
and steps the optimiser), so that entry stays.

Freed memory is kept in the process (`keep_freed_memory`): a training step allocates
and frees the same activation buffers, a few MB each, and by default glibc serves
blocks above its mmap threshold with fresh mmaps and trims the heap top as soon as it
is free, so every step paid page faults for memory it had just given away (conv4,
20-way 1-shot 5-query at 28 px, bf16 + channels_last, 2 threads, Intel Xeon with AMX:
17.8 to 27 training steps per second; the memory kept is bounded by the step's peak).

Decision: no fp16 fallback; it needs a GradScaler around MAML's second-order inner
loop, and the devices without bf16 are old GPUs and CPUs, where fp32 is as fast.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fewshot.config import TrainConfig
from fewshot.errors import ConfigError
from fewshot.methods.base import Predictor, map_tensors

# bf16 convolution against fp32 on a CPU without native bf16 (AMD EPYC, AVX2 only,
# conv4 28 px: 0.7-0.8 against 5-6 episodes/s; ../shared/specs/platform-notes.md).
EMULATED_BF16_SLOWDOWN = "7 to 8 times"
PROBE_SECONDS = 2.0  # time budget of one candidate's timed steps, after a warm-up step
PROBE_STEPS = 3
# A run this many times faster (episodes per second) than the probe of its execution
# said: the probe was slowed by other work (module docstring).
CONTENDED_PROBE = 1.5
# oneDNN's ISA levels without bf16 instructions (its ONEDNN_MAX_CPU_ISA names).
BELOW_BF16_ISAS = {
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"
}  # fmt: skip
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True if applied (elsewhere than glibc, no
    change)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )


def cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of `keys`."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (the platform's word elsewhere)."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((cpuinfo("flags", "Features") or "").split())


def cpu_native_bf16() -> bool:
    """Whether oneDNN computes bf16 in hardware here: AMX or AVX512-BF16 on x86 (and
    not switched off by ONEDNN_MAX_CPU_ISA), bf16 instructions on ARM. torch's own check
    (`_is_mkldnn_bf16_supported`) also says yes on plain AVX-512, where bf16 is
    emulated, so the flags decide."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    flags = cpu_flags()
    if platform.machine() in ("x86_64", "AMD64"):
        limited = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in BELOW_BF16_ISAS
        return not limited and bool(flags & {"amx_bf16", "avx512_bf16"})
    return "bf16" in flags or not flags


def bf16_on_gpu() -> bool:
    """Native bf16 (Ampere and later). Older GPUs only emulate it, slower than fp32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def native_bf16(device: torch.device) -> bool:
    return bf16_on_gpu() if device.type == "cuda" else cpu_native_bf16()


def pick_device(name: str) -> torch.device:
    """The device of `train.device`. A GPU is named by its index: the current device,
    which Ray Train sets to the worker's own GPU (so workers sharing a node don't all
    land on GPU 0)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "train.device: cuda but no GPU is visible to torch; use train.device=auto or cpu"
        )
    return torch.device("cuda", torch.cuda.current_device())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return count or 1


def available_cpus(allotted: float | None = None) -> int:
    """Threads for this process: a Ray worker's CPU allotment (`allotted`), else the CPUs
    it may run on, within its cgroup's CPU quota."""
    if allotted is not None:
        return max(1, int(allotted))
    count = usable_cpus()
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    return count


def check_threads(threads: int | None) -> None:
    """Refuse `train.threads` above the CPUs this process may run on, rather than cap it
    with a warning: OpenMP threads beyond the cores wait for each other at every
    operation (1000 threads on 2 CPUs: a 1-step run took 211 s instead of 6 s), and a
    capped run would not be the run the config asked for. Checked here, on the machine
    that computes, not at validation: a config is often validated on another machine (a
    Ray cluster's driver)."""
    cpus = usable_cpus()
    if threads is not None and threads > cpus:
        raise ConfigError(
            f"train.threads: {threads} but this process may use {cpus} CPUs here; set at most "
            f"{cpus}, or leave it unset to use the CPUs it is given"
        )


def precisions(precision: str, device: torch.device, allow_slow: bool) -> list[str]:
    """The precisions `train.precision` allows on `device`, preferred first."""
    native = native_bf16(device)
    if precision == "bf16" and not native:
        if device.type == "cuda":
            raise ConfigError(
                f"train.precision: bf16 but {device_name(device)} has no native bf16; use "
                "train.precision=auto (fp32 there) or fp32"
            )
        if not allow_slow:
            raise ConfigError(
                f"train.precision: bf16 but this CPU ({cpu_name()}, "
                f"{torch.backends.cpu.get_cpu_capability()}) has no native bf16, so bf16 runs "
                f"about {EMULATED_BF16_SLOWDOWN} slower than fp32 here; use "
                "train.precision=auto (or set train.allow_slow_precision=true to test that path)"
            )
    if precision == "auto":
        return ["bf16" if native else "fp32"]
    return [precision]


@dataclass(frozen=True)
class Execution:
    """One way to compute a step: what the probe times and the runtime applies."""

    precision: str  # "bf16" (autocast) or "fp32"
    channels_last: bool

    def __str__(self) -> str:
        return f"{self.precision}{' + channels_last' if self.channels_last else ''}"


def candidates(train: TrainConfig, device: torch.device) -> list[Execution]:
    """Every execution the config allows on `device`, the rule's choice first."""
    layouts = [True, False] if train.channels_last == "auto" else [train.channels_last]
    allowed = precisions(train.precision, device, train.allow_slow_precision)
    return [Execution(p, c) for p in allowed for c in layouts]


@dataclass(frozen=True)
class Probe:
    """The run's own work, to time each candidate execution on: `step(runtime)` runs
    one forward and backward pass under `runtime`; `shape` names what it computes
    (method, backbone, episode shape), part of the cache key."""

    shape: str
    step: Callable[[Runtime], None]


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed, and how that was decided."""

    device: torch.device
    execution: Execution
    threads: int
    chosen_by: str = "rule"  # config | rule | probe | cache
    speeds: tuple[tuple[str, float], ...] = ()  # the probe's steps/s per candidate
    cache_key: str | None = None  # the cache entry of the probe's answer (confirm_cache)

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return torch.bfloat16 if self.execution.precision == "bf16" else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.execution.channels_last else torch.contiguous_format

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def with_execution(self, execution: Execution) -> Runtime:
        return Runtime(
            self.device, execution, self.threads, self.chosen_by, self.speeds, self.cache_key
        )

    @classmethod
    def of(cls, train: TrainConfig, cpus: float | None = None, probe: Probe | None = None):
        """The runtime of `train` (the config's `train` section): a choice, which leaves the
        process's thread count as it was (`apply` makes it the process's). `cpus`: a Ray
        worker's CPU allotment."""
        check_threads(train.threads)
        threads = train.threads or available_cpus(cpus)
        device = pick_device(train.device)
        options = candidates(train, device)
        if len(options) == 1:
            explicit = train.precision != "auto" and train.channels_last != "auto"
            return cls(device, options[0], threads, "config" if explicit else "rule")
        if probe is None:
            return cls(device, options[0], threads, "rule")
        return choose(cls(device, options[0], threads), options, probe)

    @classmethod
    def for_inference(cls, cpus: float | None = None) -> Runtime:
        """How a loaded model answers requests here, whatever machine trained it: the
        rule's choice for this machine (bf16 where the device computes it natively,
        channels_last) on the CPUs given (`cpus`: a Ray Serve replica's share)."""
        return cls.of(TrainConfig(), cpus)

    @classmethod
    def here(cls) -> Runtime:
        """CPU fp32 on the process's threads: computing with no runtime chosen."""
        return cls(torch.device("cpu"), Execution("fp32", False), torch.get_num_threads())

    def apply(self) -> Runtime:
        """Make the process compute with this runtime's threads (a process-wide setting),
        keeping freed memory (`keep_freed_memory`). For whoever owns the process: a
        training worker, a server; a model loaded into someone else's process leaves
        them as they are."""
        torch.set_num_threads(self.threads)
        keep_freed_memory()
        return self

    def computed(self, function: Callable, *args):
        """`function(*args)` (a model's `predict`, `features`, `prepare` or `score`) as this
        runtime computes: the tensors of `args` (alone, or in the dicts and tuples of
        features and prepared support sets) on its device and, images [B, C, H, W], in
        its memory format; its precision; no autograd. The result's tensors come back on
        the CPU in fp32."""

        def move(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4:
                return x.to(self.device, memory_format=self.memory_format)
            return x.to(self.device)

        with torch.no_grad(), self.autocast():
            result = function(*(map_tensors(move, a) for a in args))
        return map_tensors(lambda x: x.float().cpu(), result)

    def predict(
        self,
        model: Predictor,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        transductive: bool = False,
    ) -> torch.Tensor:
        """A task's logits [M, N] from `model`'s whole-task `predict` (its
        `predict_transductive` with `transductive`), as this runtime computes: the one
        path of a task through a model, for the pyfunc, both servers and evaluation."""
        predict = model.predict_transductive if transductive else model.predict
        return self.computed(predict, support_x, support_y, query_x)

    def params(self) -> dict[str, str]:
        """The choice as run params (`runtime.*`)."""
        return {
            "runtime.device": device_name(self.device),
            "runtime.device_type": self.device.type,
            "runtime.precision": self.execution.precision,
            "runtime.memory_format": "channels_last" if self.execution.channels_last else "nchw",
            "runtime.threads": str(self.threads),
            "runtime.cpu": cpu_name(),
            "runtime.cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "runtime.native_bf16": str(native_bf16(self.device)).lower(),
            "runtime.chosen_by": self.chosen_by,
        }

    def line(self) -> str:
        """The choice in one line, printed when training starts."""
        native = "native bf16" if native_bf16(self.device) else "no native bf16"
        if self.device.type == "cuda":
            where = f"{device_name(self.device)} ({native})"
        else:
            where = f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, {native})"
        why = self.chosen_by
        if self.speeds:
            why += ": " + ", ".join(f"{name} {speed:.1f}" for name, speed in self.speeds)
            why += " steps/s"
        return f"runtime: {where}, {self.execution}, {self.threads} threads ({why})"


def fingerprint(runtime: Runtime, shape: str) -> str:
    """What a probe's answer depends on: the machine, torch, threads and the work."""
    parts = [
        device_name(runtime.device),
        torch.backends.cpu.get_cpu_capability(),
        str(native_bf16(runtime.device)),
        torch.__version__,
        str(runtime.threads),
        shape,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_path() -> Path:
    """$FEWSHOT_CACHE_DIR/runtime.json, else ~/.cache/fewshot/runtime.json."""
    root = os.environ.get("FEWSHOT_CACHE_DIR") or Path.home() / ".cache" / "fewshot"
    return Path(root) / "runtime.json"


def read_cache() -> dict:
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: probe again and rewrite it
    return cache if isinstance(cache, dict) else {}


def write_cache(key: str, entry: dict | None) -> None:
    """Add one answer, or drop it (`entry` None); atomic, so concurrent runs leave a whole
    file either way."""
    path, cache = cache_path(), read_cache()
    if entry is None:
        cache.pop(key, None)
    else:
        cache[key] = entry
    with contextlib.suppress(OSError):  # a read-only home only costs the next run a probe
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def steps_per_second(step: Callable[[], None]) -> float:
    """Timed calls of `step` after one untimed warm-up call (which builds the kernels):
    `PROBE_STEPS` of them, or fewer once `PROBE_SECONDS` have passed. The fastest call
    counts: contention from other processes only ever slows a call down."""
    step()
    fastest, started = float("inf"), time.perf_counter()
    for _ in range(PROBE_STEPS):
        begin = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - begin)
        if time.perf_counter() - started > PROBE_SECONDS:
            break
    return 1.0 / fastest


def choose(base: Runtime, options: list[Execution], probe: Probe) -> Runtime:
    """The fastest of `options` on `probe`, from the cache when this machine has timed
    this shape before."""
    key = fingerprint(base, probe.shape)
    cached = read_cache().get(key)
    if cached:
        known = {str(o): o for o in options}
        if cached.get("choice") in known:
            speeds = tuple((name, float(s)) for name, s in cached.get("speeds", []))
            choice = known[cached["choice"]]
            return Runtime(base.device, choice, base.threads, "cache", speeds, key)
    speeds = []
    # A probe times training steps in the training process, computing as the run will:
    # with the run's threads, and freed memory kept (without it a step ran at 17.8
    # instead of 27 per second; module docstring), as the run keeps it too.
    keep_freed_memory()
    # It leaves the run's random streams and the process's threads as they were.
    with fork_rng(base.device), using_threads(base.threads):
        for option in options:
            runtime = base.with_execution(option)
            speeds.append((str(option), steps_per_second(lambda r=runtime: probe.step(r))))
    best = max(range(len(options)), key=lambda i: speeds[i][1])
    write_cache(key, {"choice": str(options[best]), "speeds": speeds, "shape": probe.shape})
    return Runtime(base.device, options[best], base.threads, "probe", tuple(speeds), key)


def confirm_cache(runtime: Runtime, episodes_per_second: float) -> str | None:
    """Drop the cached probe behind `runtime` when a run trains `CONTENDED_PROBE` times
    faster (`episodes_per_second`, one task's forward and backward pass each, as a probe
    step is) than it said; returns the line to print then, else None."""
    probed = dict(runtime.speeds).get(str(runtime.execution))
    if runtime.cache_key is None or not probed or episodes_per_second < CONTENDED_PROBE * probed:
        return None
    write_cache(runtime.cache_key, None)
    return (
        f"runtime: training runs {episodes_per_second:.1f} episodes/s, {runtime.execution} "
        f"was probed at {probed:.1f}: the probe ran beside other work, so it is dropped from "
        f"{cache_path()} and the next run probes again"
    )


@contextlib.contextmanager
def using_threads(threads: int) -> Iterator[None]:
    """torch computes with `threads` threads inside the block, and with the process's own
    count again after it. Only where one thread computes at a time: the count is
    process-wide."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def fork_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def module_probe(module: torch.nn.Module, shape: str, loss: Callable) -> Probe:
    """A probe that runs `loss(copy, runtime)` and its backward pass on a copy of
    `module` (so batch-norm statistics and weights of the real one stay untouched),
    moved to each candidate's device and memory format."""
    copies: list[torch.nn.Module] = []  # made at the first step: most runs never probe

    def step(runtime: Runtime) -> None:
        if not copies:
            copies.append(copy.deepcopy(module))
        twin = copies[0].to(runtime.device, memory_format=runtime.memory_format)
        twin.zero_grad(set_to_none=True)
        with runtime.autocast():
            total = loss(twin, runtime)
        total.backward()

    return Probe(shape, step)
