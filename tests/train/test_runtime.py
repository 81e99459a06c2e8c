"""Where and how the loop computes (train.loop.Runtime), checked without a GPU; the
GPU runs themselves are in test_gpu.py."""

import pytest
import torch

from fewshot.config import load_config
from fewshot.data.episodes import to_device
from fewshot.errors import ConfigError
from fewshot.train import loop
from fewshot.train.distributed import backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("precision", "expected"), [("fp32", None), ("bf16", torch.bfloat16), ("auto", None)]
)
def test_precision_on_cpu(precision, expected):
    assert loop.autocast_dtype(precision, CPU) is expected


@pytest.mark.parametrize(
    ("native", "precision", "expected"),
    [
        (True, "auto", torch.bfloat16),
        (True, "bf16", torch.bfloat16),
        (True, "fp32", None),
        (False, "auto", None),  # an old GPU only emulates bf16: fp32 is faster
        (False, "fp32", None),
    ],
)
def test_precision_on_gpu_follows_native_bf16(monkeypatch, native, precision, expected):
    monkeypatch.setattr(loop, "bf16_on_gpu", lambda: native)
    assert loop.autocast_dtype(precision, CUDA) is expected


def test_bf16_asked_of_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(loop, "bf16_on_gpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"^train.precision: bf16 but Tesla V100 has no"):
        loop.autocast_dtype("bf16", CUDA)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_one_line():
    assert loop.pick_device("auto") == CPU
    with pytest.raises(ConfigError, match=r"^train.device: cuda but no GPU is visible"):
        loop.pick_device("cuda")


def test_host_tensors_stay_unpinned_on_cpu():
    x = torch.zeros(2, 3)
    assert to_device(x, CPU) is x


def test_nccl_for_gpu_workers_gloo_otherwise():
    assert backend(load_config(None, ["distributed.workers=2"])) == "gloo"
    gpu = load_config(None, ["distributed.workers=2", "distributed.use_gpu=true"])
    assert backend(gpu) == "nccl"
