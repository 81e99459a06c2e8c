"""`ray job submit --working-dir . -- python jobs/promote.py NAME [--version V] [--episodes 600]`"""

from _entry import run

run("promote")
