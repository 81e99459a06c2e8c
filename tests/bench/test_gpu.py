"""`fewshot bench gpu`: its refusal without a GPU, and its timing code run on the CPU
with a tiny model (the figures themselves need a GPU: benchmarks/results/gpu.md)."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from fewshot.bench import gpu

TINY = ["train.device=cpu", "backbone.name=conv4", "backbone.width=8", "data.image_size=16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "bench", "gpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "error: fewshot bench gpu: no CUDA GPU is visible to torch; " + (
        "run it on a GPU machine\n"
    )
    assert not out.exists()


def test_bench_shape_is_the_requested_one():
    config = gpu.bench_config()
    e = config.episode
    assert (config.backbone.name, config.data.image_size) == ("resnet12", 84)
    assert (e.n_way, e.k_shot, e.q_query, e.meta_batch) == (5, 1, 15, 1)
    assert gpu.random_images(classes=6, per_class=20, size=16).images.shape == (120, 3, 16, 16)


@pytest.mark.parametrize("speed", [gpu.loop_speed, gpu.bare_speed])
def test_speeds_are_measured_after_warm_up(speed):
    images = gpu.random_images(classes=6, per_class=20, size=16)
    assert speed(gpu.bench_config(*TINY), images, steps=2, warmup=1) > 0


def test_easyfsl_row_runs_or_says_it_is_not_installed():
    init = torch.utils.data.Sampler.__init__
    images = gpu.random_images(classes=6, per_class=20, size=16)
    speed = gpu.easyfsl_speed(gpu.bench_config(*TINY), images, steps=2, warmup=1)
    assert torch.utils.data.Sampler.__init__ is init  # the shim does not outlive the bench
    if importlib.util.find_spec("easyfsl") is None:  # not a dependency
        assert speed is None
    else:
        assert speed > 0
