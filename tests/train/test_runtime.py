"""Where and how a run computes (fewshot.runtime), checked without a GPU; the GPU runs
themselves are in test_gpu.py. The hardware checks are monkeypatched so that both
kinds of CPU (and GPU) are tested on whichever machine runs the suite."""

import json
import time

import mlflow
import pytest
import torch

from fewshot import runtime
from fewshot.config import load_config
from fewshot.data.episodes import to_device
from fewshot.errors import ConfigError
from fewshot.runtime import Execution, Probe, Runtime
from fewshot.tracking import tracking_uri
from fewshot.train.budget import WINDOW_STEPS
from fewshot.train.distributed import backend
from fewshot.train.loop import Worker
from fewshot.train.runner import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A probe cache of this test's own."""
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "runtime.json"


def train_section(*overrides: str):
    return load_config(None, list(overrides)).train


@pytest.mark.parametrize(("native", "expected"), [(True, ["bf16"]), (False, ["fp32"])])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: native)
    assert runtime.precisions("auto", CPU, allow_slow=False) == expected


@pytest.mark.parametrize(("native", "expected"), [(True, ["bf16"]), (False, ["fp32"])])
def test_auto_precision_on_gpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "bf16_on_gpu", lambda: native)
    assert runtime.precisions("auto", CUDA, allow_slow=False) == expected


def test_explicit_precisions_are_kept_where_the_hardware_has_them(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: True)
    assert runtime.precisions("bf16", CPU, allow_slow=False) == ["bf16"]
    assert runtime.precisions("fp32", CPU, allow_slow=False) == ["fp32"]


def test_bf16_on_a_cpu_without_it_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    with pytest.raises(ConfigError) as refused:
        Runtime.of(train_section("train.precision=bf16", "train.channels_last=false"))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("train.precision: bf16 but this CPU (")
    assert "7 to 8 times slower than fp32" in message and "train.precision=auto" in message


def test_allow_slow_precision_lets_emulated_bf16_through(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    settings = train_section(
        "train.precision=bf16", "train.channels_last=false", "train.allow_slow_precision=true"
    )
    assert Runtime.of(settings).amp is torch.bfloat16


def test_bf16_asked_of_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_on_gpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"^train.precision: bf16 but Tesla V100 has no"):
        runtime.precisions("bf16", CUDA, allow_slow=False)


def test_oneDNN_limited_below_bf16_is_not_native(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not runtime.cpu_native_bf16()


def test_every_layout_is_a_candidate_unless_the_config_names_one(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    both = runtime.candidates(train_section(), CPU)
    assert both == [Execution("fp32", True), Execution("fp32", False)]
    one = runtime.candidates(train_section("train.channels_last=false"), CPU)
    assert one == [Execution("fp32", False)]


def test_probe_picks_the_faster_candidate_and_caches_it(cache):
    slow = Execution("fp32", True)
    calls: list[Execution] = []

    def step(candidate: Runtime) -> None:
        calls.append(candidate.execution)
        if candidate.execution == slow:
            time.sleep(0.02)  # the artificially slow candidate

    options = [slow, Execution("fp32", False)]
    base = Runtime(CPU, slow, threads=1)
    first = runtime.choose(base, options, Probe("shape", step))
    assert first.execution == Execution("fp32", False) and first.chosen_by == "probe"
    speeds = dict(first.speeds)
    assert speeds["fp32"] > 2 * speeds["fp32 + channels_last"]
    assert cache.is_file()

    calls.clear()
    again = runtime.choose(base, options, Probe("shape", step))
    assert again.execution == first.execution and again.chosen_by == "cache"
    assert calls == []  # the second run pays nothing
    other = runtime.choose(base, options, Probe("another shape", step))
    assert other.chosen_by == "probe"  # the cache is per shape


def test_an_unreadable_cache_is_probed_again(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    options = [Execution("fp32", True), Execution("fp32", False)]
    chosen = runtime.choose(Runtime(CPU, options[0], 1), options, Probe("s", lambda r: None))
    assert chosen.chosen_by == "probe"


def test_threads_follow_the_cpus_a_ray_worker_is_given():
    assert runtime.available_cpus(1.0) == 1
    assert runtime.available_cpus(0.5) == 1
    assert runtime.available_cpus(3.0) == 3
    assert runtime.available_cpus() >= 1
    torch.set_num_threads(runtime.usable_cpus() + 1)  # neither 1 nor what a choice gives
    before = torch.get_num_threads()
    chosen = Runtime.of(train_section(), cpus=1.0)
    assert chosen.threads == 1
    assert torch.get_num_threads() == before  # a choice, not applied
    chosen.apply()
    assert torch.get_num_threads() == 1


def test_a_probe_times_with_the_runs_threads_then_gives_the_process_its_own(cache):
    torch.set_num_threads(runtime.usable_cpus() + 1)
    before = torch.get_num_threads()
    seen: list[int] = []
    options = [Execution("fp32", True), Execution("fp32", False)]
    probe = Probe("threads", lambda r: seen.append(torch.get_num_threads()))
    runtime.choose(Runtime(CPU, options[0], threads=1), options, probe)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


def test_a_training_worker_applies_its_threads(tiny_config, cache):
    torch.set_num_threads(runtime.usable_cpus() + 1)
    Worker(tiny_config("train.threads=1"))
    assert torch.get_num_threads() == 1


def test_more_threads_than_the_cpus_it_may_use_are_refused_where_the_runtime_is_applied():
    cpus = runtime.usable_cpus()
    before = torch.get_num_threads()
    message = f"^train.threads: {cpus + 1} but this process may use {cpus} CPUs here; set at most"
    with pytest.raises(ConfigError, match=message):
        Runtime.of(train_section(f"train.threads={cpus + 1}"))
    assert torch.get_num_threads() == before  # refused before the setting was applied
    assert Runtime.of(train_section(f"train.threads={cpus}")).threads == cpus


def test_the_choice_is_logged_as_run_params(workdir, synthetic_store, cache):
    config = load_config(
        None,
        [
            f"data.path={synthetic_store}",
            "data.image_size=16",
            "backbone.width=8",
            "episode.q_query=3",
            "episode.meta_batch=1",
            "train.steps=2",
            "train.eval_every=2",
            "train.val_episodes=2",
            "evaluate.episodes=2",
        ],
    )
    result = train(config)
    # An absolute URI: MLflow caches stores by URI, and a relative one would find the
    # store of the first directory that used it.
    params = mlflow.MlflowClient(tracking_uri()).get_run(result.run_id).data.params
    expected_precision = "bf16" if runtime.cpu_native_bf16() else "fp32"
    assert params["runtime.precision"] == expected_precision
    assert params["runtime.memory_format"] in ("channels_last", "nchw")
    assert params["runtime.chosen_by"] == "probe"  # two layouts, a fresh cache
    assert params["runtime.threads"] == str(runtime.available_cpus())
    assert params["runtime.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert params["runtime.cpu"] == runtime.cpu_name()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_one_line():
    assert runtime.pick_device("auto") == CPU
    with pytest.raises(ConfigError, match=r"^train.device: cuda but no GPU is visible"):
        runtime.pick_device("cuda")


def test_host_tensors_stay_unpinned_on_cpu():
    x = torch.zeros(2, 3)
    assert to_device(x, CPU) is x


def test_nccl_for_gpu_workers_gloo_otherwise():
    assert backend(load_config(None, ["distributed.workers=2"])) == "gloo"
    gpu = load_config(None, ["distributed.workers=2", "distributed.use_gpu=true"])
    assert backend(gpu) == "nccl"


def test_a_cached_probe_that_a_run_outpaces_is_dropped(cache):
    key = "machine-and-shape"
    runtime.write_cache(key, {"choice": "fp32", "speeds": [["fp32", 10.0]], "shape": "s"})
    chosen = Runtime(CPU, Execution("fp32", False), 1, "cache", (("fp32", 10.0),), key)
    assert runtime.confirm_cache(chosen, 14.0) is None  # about what the probe said
    assert runtime.confirm_cache(chosen, 2.0) is None  # a busy run says nothing of it
    assert key in runtime.read_cache()
    line = runtime.confirm_cache(chosen, 40.0)
    assert key not in runtime.read_cache()
    assert line.startswith("runtime: training runs 40.0 episodes/s, fp32 was probed at 10.0")


def test_a_contended_probe_does_not_stay_in_the_cache(tiny_config, cache):
    config = tiny_config("train.steps=40")
    assert Worker(config).runtime.chosen_by == "probe"
    # What a probe timed beside other work would have written: the same candidates, much
    # slower (a hundredth: contention costs 2 to 7 times, so that this run outpaces it
    # however busy the machine is while it runs).
    (key,) = json.loads(cache.read_text())
    entry = runtime.read_cache()[key]
    runtime.write_cache(key, {**entry, "speeds": [[n, s / 100] for n, s in entry["speeds"]]})
    contended = Worker(config)
    assert contended.runtime.chosen_by == "cache"
    for _ in range(3 * WINDOW_STEPS + 1):  # the start-up windows time the run
        contended.train_step()
    assert key not in runtime.read_cache()
    assert Worker(config).runtime.chosen_by == "probe"  # the next run measures again
