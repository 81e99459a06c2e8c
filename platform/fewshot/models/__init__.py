"""Backbones (feature extractors)."""
