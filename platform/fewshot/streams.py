"""Every random stream of the package, in one place.

Anything random is drawn from `numpy.random.default_rng([stream, seed, ...])`, so two
draws with the same seed are independent exactly when their streams differ. A new
consumer of randomness takes a new member here, never a number of its own.
"""

from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    TRAIN = 0  # training episodes
    VAL = 1  # validation episodes
    TEST = 2  # the fixed test episodes
    MIX = 3  # task mixup's partner tasks and mixing draws
    PRETRAIN = 4  # whole-class pre-training batches
    HARD = 5  # MTL's hard tasks
    HOLD_OUT = 6  # the validation groups held out of the train split
