"""Distillation: meta-training towards a trained teacher's answers as well as the labels.

The teacher (`distill.teachers`: one trained model, or the ensemble of several, as
`fewshot ensemble` combines them) classifies each training episode's queries from the
same supports the student sees, and the student's loss gains the soft-target term of
Hinton et al. (2015) over the episode's N classes:

    p_t = softmax(teacher(q) / T),   log p_s = log_softmax(student(q) / T)     [M, N]
    distill = T^2 * mean_q KL(p_t || p_s)
    loss = (1 - w) * the method's loss + w * distill

w: `distill.weight`, T: `distill.temperature` (T^2 keeps the term's gradients at the
labels' scale as T grows). An ensemble's answer is its members' mean log-probability,
which softmax(. / T) softens like any logits.

The student is an ordinary model of its method: the teacher is no part of it, so its
model file is what `register`, `promote` and `serve` take from any run, at one
backbone's cost where the ensemble it learned from costs one per member.

Decisions: the teacher answers the student's episode itself, jitter included, in eval
mode with `distill.teacher_views` test views (default 1: each view is a forward pass of
every member on every image, the student's step costs about 1 + 2/3 per member-view);
task mixup is refused in config (its loss is on mixed hidden representations, which no
teacher answers); MTL's extra hard tasks are not distilled (only the step's own tasks
pass through here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot.config import DistillConfig
from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError
from fewshot.methods import FewShotMethod, Loss, Shape
from fewshot.methods.base import Predictor
from fewshot.train.tasks import TaskSource, ToDevice


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[M, N] logits of the student and the teacher -> T^2 * mean_q KL(p_t || p_s), in fp32."""
    t = temperature
    teacher = (teacher_logits.float() / t).log_softmax(dim=1)
    student = (student_logits.float() / t).log_softmax(dim=1)
    return t * t * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class Distillation:
    """A task source (train/tasks.py): `source`'s tasks, their loss joined by the
    teacher's soft targets."""

    def __init__(self, settings: DistillConfig, teacher: Predictor, source: TaskSource) -> None:
        self.settings, self.source = settings, source
        self.teacher = teacher.with_test_views(settings.teacher_views).eval()
        self.teacher.requires_grad_(False)

    @staticmethod
    def check(teacher: Predictor, shape: Shape, sources: list[str]) -> None:
        """Refuse a teacher that cannot answer the student's episodes."""
        t = teacher.shape
        if (t.channels, t.image_size) != (shape.channels, shape.image_size):
            raise ConfigError(
                f"distill.teachers: {sources} take {t.channels}x{t.image_size}px images, the "
                f"student trains on {shape.channels}x{shape.image_size}px; give teachers "
                "trained at data.image_size "
                f"{shape.image_size}"
            )
        if not teacher.answers_way(shape.n_way):
            raise ConfigError(
                f"distill.teachers: {sources} cannot answer {shape.n_way}-way episodes; give "
                "teachers whose method answers any number of ways (protonet, maml, ...)"
            )

    def loss(
        self, method: FewShotMethod, step: int, task: int, to_device: ToDevice
    ) -> tuple[Loss, Episode]:
        loss, episode = self.source.loss(method, step, task, to_device)
        with torch.no_grad():
            answers = self.teacher.predict(episode.support_x, episode.support_y, episode.query_x)
        distill = soft_target_loss(loss.logits, answers, self.settings.temperature)
        w = self.settings.weight
        total = (1 - w) * loss.total + w * distill
        parts = {**loss.parts, "distill": distill}
        return Loss(total, loss.logits, parts, loss.embeddings), episode
