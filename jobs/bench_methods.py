"""`ray job submit --working-dir . -- python jobs/bench_methods.py --config
jobs/configs/bench/methods.yaml`: the methods table, run on the cluster."""

from _entry import run

run("bench", "methods")
