"""`ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune/X.yaml`:
a hyper-parameter search (`fewshot tune`) run on the cluster; `--resume NAME` continues one."""

from _entry import run

run("tune")
