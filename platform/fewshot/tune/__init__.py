"""Hyper-parameter search with Ray Tune: `fewshot tune --config jobs/configs/tune/X.yaml`.

`space` reads and checks a tune file (a base train config, a search space over its
dotted fields, the search settings) before anything starts; `search` runs it: every
trial is one Ray Train run of the base config with the sampled values, scored on
validation classes, and only the best config is evaluated on the test episodes.
"""
