"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/X.yaml`"""

from _entry import run

run("train")
