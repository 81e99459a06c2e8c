"""The promotion gate: the alias `champion` moves only to a version shown to be better.

Challenger and champion are scored on the same fixed test episodes (the challenger's
evaluation dataset, split, shape and seed unless overridden), each model seeing the
images as its own pyfunc would: decoded at its size and channels, inverted as it was
trained, standardised with its own statistics. On per-episode accuracies a_i
(challenger) and b_i (champion), d_i = a_i - b_i, a one-sided paired t-test asks
whether mean(d) > margin:

    lower = mean(d) - t_{confidence, n-1} * std(d) / sqrt(n)      promote iff lower > margin

Episodes are the natural pairing unit: both models face the same classes and
images, so the test sees only the difference the model makes. With hundreds of
episodes the t-distribution of the mean holds even though accuracies are discrete.

Every decision is written to the challenger version's `gate.*` tags (all keys, every
time, so no tag of an earlier decision survives): decision (first, promoted, refused,
forced), both scores with 95% CIs, the paired difference, its lower bound, the
p-value, margin, confidence, the episodes used, the force reason and the time.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import stats

from fewshot.config import Config
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import ImageSet, load_split
from fewshot.errors import RegistryError, RequestError
from fewshot.evaluate import Accuracy, episode_accuracies, episode_count, mean_ci
from fewshot.registry.preprocess import Preprocessing
from fewshot.registry.pyfunc import FewShotModel
from fewshot.registry.versions import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    connect,
    load,
    require_model,
    require_version,
)
from fewshot.streams import Stream

TEST_NAME = "paired t-test, one-sided"


@dataclass(frozen=True)
class PairedTest:
    difference: float  # mean over episodes of challenger minus champion accuracy
    lower: float  # one-sided lower confidence bound of the difference
    p_value: float  # of "difference <= margin"
    passed: bool  # lower > margin


def paired_test(
    challenger: Sequence[float], champion: Sequence[float], margin: float, confidence: float
) -> PairedTest:
    """Is the challenger better than the champion by more than `margin`, at `confidence`?
    Both sequences are per-episode accuracies on the same episodes, in the same order."""
    d = np.asarray(challenger, dtype=np.float64) - np.asarray(champion, dtype=np.float64)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    if se == 0.0:  # identical on every episode up to a constant: no noise to test against
        return PairedTest(mean, mean, 0.0 if mean > margin else 1.0, mean > margin)
    lower = mean - float(stats.t.ppf(confidence, len(d) - 1)) * se
    p_value = float(stats.t.sf((mean - margin) / se, len(d) - 1))
    return PairedTest(mean, lower, p_value, lower > margin)


@dataclass(frozen=True)
class GateEpisodes:
    """The fixed test episodes both models are scored on."""

    data: Path
    split: str
    n_way: int
    k_shot: int
    q_query: int
    within_group: bool
    seed: int
    count: int

    @classmethod
    def of(
        cls,
        config: Config,
        data: Path | None = None,
        split: str | None = None,
        episodes: int | None = None,
    ) -> GateEpisodes:
        e = config.eval_episode()
        return cls(
            data=data or config.data.path,
            split=split or config.data.test_split,
            n_way=e.n_way,
            k_shot=e.k_shot,
            q_query=e.q_query,
            within_group=config.eval_within_group(),
            seed=config.evaluate.seed,
            count=episode_count(episodes, config.evaluate.episodes),
        )

    @property
    def task(self) -> str:
        return f"{self.n_way}-way {self.k_shot}-shot {self.q_query}-query"

    def load(self, like: Preprocessing) -> tuple[ImageSet, bool]:
        """The split decoded at `like`'s size, and whether the dataset inverts."""
        dataset = Preprocessing.of_dataset(self.data, like.image_size)
        if dataset.channels != like.channels:
            raise RegistryError(
                f"dataset {self.data} has {dataset.channels}-channel images, the models take "
                f"{like.channels}; pass --data DIR with a {like.channels}-channel dataset"
            )
        return load_split(self.data, self.split, like.image_size), dataset.invert

    def accuracies(self, model: FewShotModel, images: ImageSet, inverted: bool) -> list[float]:
        """Per-episode accuracies of `model` (CPU, fp32: as it is served)."""
        try:
            model.check_task(self.n_way)
        except RequestError as exc:
            raise RegistryError(f"cannot score on {self.task} episodes: {exc}") from None
        p = model.preprocessing
        # The split as this model's pyfunc would decode the same files.
        pixels = images.images if p.invert == inverted else 255 - images.images
        view = replace(images, images=pixels, mean=list(p.mean), std=list(p.std))
        sampler = EpisodeSampler(
            view, self.n_way, self.k_shot, self.q_query, within_group=self.within_group
        )
        return episode_accuracies(
            model.method, sampler.fixed_episodes(self.count, self.seed, Stream.TEST)
        )


@dataclass(frozen=True)
class Decision:
    name: str
    challenger: str  # version
    champion: str | None  # the champion version before the decision
    outcome: str  # first, promoted, refused, forced
    challenger_score: Accuracy
    champion_score: Accuracy | None
    test: PairedTest | None
    margin: float
    confidence: float
    episodes: GateEpisodes
    reason: str | None = None  # why it was forced

    @property
    def promoted(self) -> bool:
        return self.outcome != "refused"

    def summary(self) -> str:
        head = f"{self.name} version {self.challenger}: {self.outcome}"
        chal = f"challenger {self.challenger_score}"
        if self.champion is None:
            return f"{head} (no champion yet); {chal}"
        champ = f"champion v{self.champion} " + (
            str(self.champion_score) if self.champion_score else "not comparable"
        )
        if self.test is None:
            return f"{head}; {chal}, {champ}; reason: {self.reason}"
        t = self.test
        return (
            f"{head}; {chal} vs {champ}; difference {100 * t.difference:+.2f} points, "
            f"{100 * self.confidence:g}% lower bound {100 * t.lower:+.2f} vs margin "
            f"{100 * self.margin:.2f} (p = {t.p_value:.3g})"
            + (f"; reason: {self.reason}" if self.reason else "")
        )

    def tags(self) -> dict[str, str]:
        def number(value: float | None) -> str:
            return "none" if value is None else f"{value:.6g}"

        champ, t = self.champion_score, self.test
        return {
            "gate.decision": self.outcome,
            "gate.summary": self.summary()[:4000],
            "gate.challenger_acc": number(self.challenger_score.mean),
            "gate.challenger_ci95": number(self.challenger_score.ci95),
            "gate.champion_version": self.champion or "none",
            "gate.champion_acc": number(champ.mean if champ else None),
            "gate.champion_ci95": number(champ.ci95 if champ else None),
            "gate.difference": number(t.difference if t else None),
            "gate.lower_bound": number(t.lower if t else None),
            "gate.p_value": number(t.p_value if t else None),
            "gate.passed": "none" if t is None else str(t.passed).lower(),
            "gate.test": TEST_NAME,
            "gate.margin": number(self.margin),
            "gate.confidence": number(self.confidence),
            "gate.dataset": str(self.episodes.data),
            "gate.split": self.episodes.split,
            "gate.task": self.episodes.task,
            "gate.episodes": str(self.episodes.count),
            "gate.seed": str(self.episodes.seed),
            "gate.reason": self.reason or "none",
            "gate.time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


def promote(
    name: str,
    version: str | None = None,
    *,
    margin: float | None = None,
    confidence: float | None = None,
    episodes: int | None = None,
    data: Path | None = None,
    split: str | None = None,
    force: str | None = None,
    uri: str | None = None,
) -> Decision:
    """Gate `version` (default: the alias `challenger`) against the alias `champion`, move
    `champion` if it passes (or `force`, a reason, is given) and record the decision.

    margin, confidence: default to the challenger's `registry.margin` / `registry.confidence`.
    data, split, episodes: override the challenger's evaluation dataset, split and count.
    """
    if force is not None and not force.strip():
        raise RegistryError("--force needs a reason, e.g. --force 'rollback: v3 mislabels digits'")
    client = connect(uri)
    challenger_v, champion_v = _contenders(client, name, version)
    challenger = load(f"models:/{name}/{challenger_v}", uri)
    settings = challenger.config.registry
    margin = settings.margin if margin is None else margin
    confidence = settings.confidence if confidence is None else confidence
    if not 0.5 <= confidence < 1:
        raise RegistryError(f"--confidence {confidence}: use a value in [0.5, 1), e.g. 0.95")
    if not 0 <= margin < 1:
        raise RegistryError(f"--margin {margin}: use an accuracy difference in [0, 1), e.g. 0.01")
    gate = GateEpisodes.of(challenger.config, data, split, episodes)
    if gate.count < 2:
        raise RegistryError(f"--episodes {gate.count}: a paired test needs at least 2")

    images, inverted = gate.load(challenger.preprocessing)
    challenger_acc = gate.accuracies(challenger, images, inverted)
    champion_acc = None
    if champion_v is not None:
        champion = load(f"models:/{name}/{champion_v}", uri)
        try:
            _check_same_input(champion, challenger, champion_v)
            champion_acc = gate.accuracies(champion, images, inverted)
        except RegistryError:
            if force is None:
                raise
            # Forcing is how a model with another input format replaces the champion.
    test = None
    if champion_acc is not None:
        test = paired_test(challenger_acc, champion_acc, margin, confidence)

    if champion_v is None:
        outcome = "first"
    elif force is not None:
        outcome = "forced"
    else:
        outcome = "promoted" if test.passed else "refused"
    decision = Decision(
        name=name,
        challenger=challenger_v,
        champion=champion_v,
        outcome=outcome,
        challenger_score=mean_ci(challenger_acc),
        champion_score=None if champion_acc is None else mean_ci(champion_acc),
        test=test,
        margin=margin,
        confidence=confidence,
        episodes=gate,
        reason=force,
    )
    _record(client, decision)
    return decision


def _contenders(client, name: str, version: str | None) -> tuple[str, str | None]:
    """(challenger version: `version` or the alias challenger, champion version or None)."""
    require_model(client, name)
    challenger = version or alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"{name} has no alias {CHALLENGER!r}; pass --version V or register a new model"
        )
    require_version(client, name, challenger)
    champion = alias_version(client, name, CHAMPION)
    if champion == challenger:
        raise RegistryError(f"{name} version {challenger} is already the {CHAMPION}")
    return challenger, champion


def _record(client, decision: Decision) -> None:
    """The decision into the challenger's tags; on promotion, the aliases moved."""
    name, version = decision.name, decision.challenger
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        if alias_version(client, name, CHALLENGER) == version:
            # No longer a candidate; the next registration sets `challenger` again.
            client.delete_registered_model_alias(name, CHALLENGER)


def _check_same_input(champion: FewShotModel, challenger: FewShotModel, version: str) -> None:
    a, b = champion.preprocessing, challenger.preprocessing
    if (a.image_size, a.channels) != (b.image_size, b.channels):
        raise RegistryError(
            f"champion version {version} takes {a.image_size}px {a.channels}-channel images, "
            f"the challenger {b.image_size}px {b.channels}-channel: they cannot be scored on the "
            "same episodes; promote with --force REASON"
        )
