"""Backbones (feature extractors) and the fixed test-time views of their inputs."""
