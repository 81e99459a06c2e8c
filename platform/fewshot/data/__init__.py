"""Datasets: the Parquet store, the converters that fill it, and the episode sampler."""
