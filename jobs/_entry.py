"""Shared by the job entrypoints: run a `fewshot` command with the job's own code.

`ray job submit --working-dir .` ships this repository; putting its `platform/`
first on sys.path makes the job run the submitted code, not whatever version is
installed on the cluster. `fewshot submit COMMAND` runs the same commands without these
scripts (platform/fewshot/jobs.py).
"""

import sys
from pathlib import Path


def run(*command: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from fewshot.cli import main

    sys.argv = ["fewshot", *command, *sys.argv[1:]]
    main()
