"""Distillation (train/distill.py): the soft-target term against its formula, a student
that learns from a teacher's answers alone, and the teachers it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot import model_file
from fewshot.config import DistillConfig
from fewshot.errors import CheckpointError, ConfigError
from fewshot.evaluate import evaluate_method
from fewshot.train.distill import soft_target_loss
from fewshot.train.loop import Worker
from fewshot.train.runner import train


@pytest.fixture
def config(tiny_config):
    return lambda *overrides: tiny_config(
        "tracking.enabled=false", "train.precision=fp32", "evaluate.episodes=100", *overrides
    )


def test_soft_target_loss_is_t_squared_times_the_mean_kl_of_softened_answers():
    student, teacher, t = torch.randn(6, 5), 3 * torch.randn(6, 5), 4.0
    p = (teacher / t).softmax(1)
    kl = (p * (p.log() - (student / t).log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(soft_target_loss(student, teacher, t), t * t * kl)
    # Logits that differ by a constant per query give the same answer: nothing to learn.
    assert soft_target_loss(teacher + 7.0, teacher, t).abs() < 1e-5
    assert soft_target_loss(student, teacher, t) > 0


def saved(worker: Worker, path) -> str:
    model_file.save(model_file.contents(worker.config, worker.method), path)
    return str(path)


def test_a_student_learns_from_the_teachers_answers_alone(config, tmp_path):
    """distill.weight 1: the labels play no part. On these 5-way episodes of classes
    never trained on, the untrained student answers 43% (chance 20%), a teacher of 100
    steps 64%, and its student after 100 steps 71% (measured); +15 points is far above
    the fixed episodes' noise (+-2 points)."""
    teacher = Worker(config())
    for _ in range(100):
        teacher.train_step()
    path = saved(teacher, tmp_path / "teacher.pt")
    student = Worker(config("seed=1", f"distill.teachers=[{path}]", "distill.weight=1"))
    assert student.tasks.teacher.test_views == 1  # it teaches at one forward pass an image
    start = evaluate_method(student.method, student.config).mean
    metrics = student.train_step()
    assert metrics["loss"] == pytest.approx(metrics["distill"], rel=1e-6)
    for _ in range(99):
        student.train_step()
    assert evaluate_method(student.method, student.config).mean >= start + 0.15


def test_the_loss_mixes_the_labels_and_the_teacher_by_the_weight(config, tmp_path):
    path = saved(Worker(config()), tmp_path / "teacher.pt")
    student = Worker(config(f"distill.teachers=[{path}]", "distill.weight=0.25"))
    metrics = student.train_step()
    expected = 0.75 * metrics["ce"] + 0.25 * metrics["distill"]
    assert math.isclose(metrics["loss"], expected, rel_tol=1e-5)


def test_teachers_that_cannot_answer_the_episodes_are_refused(config, tmp_path):
    small = Worker(config())
    path = saved(small, tmp_path / "teacher.pt")
    with pytest.raises(ConfigError, match=r"distill.teachers: .* 1x16px .* 1x28px"):
        Worker(config("data.image_size=28", f"distill.teachers=[{path}]"))
    with pytest.raises(ConfigError, match="distill.teachers: task mixup"):
        config(f"distill.teachers=[{path}]", "task_mixup.strategy=mlti")
    with pytest.raises(ConfigError, match="distill.teacher_views"):
        config("distill.teacher_views=6")
    assert DistillConfig().teachers == []


def test_a_missing_teacher_is_refused_before_a_restart_deletes_the_run(config, tmp_path):
    settings = [f"train.output_dir={tmp_path}", "train.steps=1", "train.eval_every=1"]
    first = train(config(*settings, "name=kept"))
    with pytest.raises(CheckpointError, match="no such model file or run directory"):
        train(
            config(*settings, "name=kept", f"distill.teachers=[{tmp_path}/none.pt]"), restart=True
        )
    assert model_file.read(first.run_dir / "model.pt")
