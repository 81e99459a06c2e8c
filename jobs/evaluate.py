"""`ray job submit --working-dir . -- python jobs/evaluate.py --run RUN_ID --episodes 600`"""

from _entry import run

run("evaluate")
