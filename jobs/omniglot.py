"""`make omniglot`, or `ray job submit --working-dir . -- python jobs/omniglot.py
[--data DIR] [--minutes 40] [--set key=value ...]`: the headline model (`fewshot
omniglot`, platform/fewshot/recipes/omniglot.py), run with the job's own code."""

from _entry import run

run("omniglot")
