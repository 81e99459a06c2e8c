"""`ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train/X.yaml`"""

from _entry import run

run("train")
