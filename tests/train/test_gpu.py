"""The GPU path matches the CPU: the same first steps give the same losses, within
what the arithmetic allows. Run on a GPU machine with `pytest -m gpu`; skipped here.

fp32 is compared with TF32 off (TF32 rounds conv and matmul inputs to 10 mantissa bits,
which is a precision choice, not a bug). Tolerances, from CPU runs of the same steps:
summing in another order alone (fp32 channels_last against contiguous) moves ProtoNet's
fifth loss by 4e-4 relative, so fp32 gets 2e-3; bf16 autocast plus channels_last, the
fast path, moves the first loss by about 1% and the fifth by 5% (the small model's
training amplifies it), so bf16 gets 10%.
"""

import pytest
import torch

from fewshot.runtime import bf16_on_gpu
from fewshot.streams import Stream
from fewshot.train.datasets import Datasets
from fewshot.train.loop import Worker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 5
METHODS = {
    "protonet": ["method.name=protonet"],
    "maml": ["method.name=maml", "method.inner_steps=2"],
}


@pytest.fixture
def exact_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def losses(config, data) -> list[float]:
    worker = Worker(config, data=data)
    return [worker.train_step()["loss"] for _ in range(STEPS)]


def first_losses(tiny_config, method: str, *runtime: str) -> tuple[list[float], list[float]]:
    """(CPU fp32 losses, losses with `runtime` settings) of the first steps."""
    base = [*METHODS[method], "train.lr=0.001", "train.schedule=constant"]
    cpu = tiny_config(*base, "train.device=cpu", "train.precision=fp32")
    data = Datasets.load(cpu)
    return losses(cpu, data), losses(tiny_config(*base, *runtime), data)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gpu_fp32_matches_cpu(tiny_config, exact_fp32, method):
    cpu, gpu = first_losses(tiny_config, method, "train.device=cuda", "train.precision=fp32")
    assert gpu == pytest.approx(cpu, rel=2e-3)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gpu_bf16_channels_last_matches_cpu(tiny_config, method):
    if not bf16_on_gpu():
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16")
    runtime = ["train.device=cuda", "train.precision=bf16", "train.channels_last=true"]
    cpu, gpu = first_losses(tiny_config, method, *runtime)
    assert gpu == pytest.approx(cpu, rel=1e-1)


def test_auto_precision_is_bf16_where_the_gpu_has_it(tiny_config):
    worker = Worker(tiny_config("train.device=auto", "train.precision=auto"))
    assert worker.device.type == "cuda"
    assert worker.amp == (torch.bfloat16 if bf16_on_gpu() else None)


def test_episodes_reach_the_gpu_in_the_asked_memory_format(tiny_config):
    worker = Worker(tiny_config("train.device=cuda", "train.channels_last=true"))
    episode = worker.to_device(worker.sampler.episode(Stream.TRAIN, 0, 0))
    assert episode.support_x.is_cuda and episode.query_y.is_cuda
    assert episode.query_x.is_contiguous(memory_format=torch.channels_last)
