"""The `fewshot` command line. Every user error prints one line and exits 2."""

from __future__ import annotations

import typer

from fewshot.cli import bench, data, gallery, jobs, registry, run, tune
from fewshot.cli.common import user_errors_exit_2

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Distributed few-shot meta-training, tracked and served with MLflow.",
)
# `fewshot --help` lists the commands in the order they are added here, then the groups.
for command in (
    run.train,
    run.ensemble,
    run.evaluate,
    run.demo,
    run.omniglot,
    registry.register,
    registry.promote,
    run.predict,
    registry.serve,
    tune.tune,
):
    app.command()(command)
app.command(context_settings=jobs.SUBMIT_SETTINGS)(jobs.submit)
app.add_typer(data.data_app, name="data")
app.add_typer(registry.models_app, name="models")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(gallery.gallery_app, name="gallery")


def main() -> None:
    with user_errors_exit_2():
        app()
