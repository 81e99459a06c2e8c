"""Serving: the scoring server launch (`server.py`), its Python client (`client.py`) and
the support/query folders of `fewshot predict` (`folders.py`)."""

from fewshot.serve.client import Client

__all__ = ["Client"]
