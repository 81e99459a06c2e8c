"""fewshot: distributed few-shot meta-training."""

__version__ = "0.1.0"
