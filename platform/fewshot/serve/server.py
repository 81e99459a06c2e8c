"""`fewshot serve`: MLflow's scoring server for the version an alias points to.

The alias is resolved once, at start, and the server is started on that version
(`models:/NAME/V`), so what it serves is what it printed; a newly promoted
champion is picked up by starting a server again (see the README for a rollover
without downtime). The server is `mlflow models serve --env-manager local`: it runs
in this environment (the project installed), and its uvicorn must be on PATH, so
this interpreter's bin folder goes first.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from fewshot.errors import RegistryError, ServeError
from fewshot.registry.versions import CHAMPION, alias_version, connect, require_model
from fewshot.tracking import tracking_uri


def resolve(name: str, alias: str = CHAMPION, uri: str | None = None) -> str:
    """The version of `name` that `alias` points to."""
    client = connect(uri)
    require_model(client, name)
    version = alias_version(client, name, alias)
    if version is None:
        raise RegistryError(
            f"{name} has no alias {alias!r}; run `fewshot promote {name}` or pass --alias"
        )
    return version


def command(model_uri: str, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", model_uri,
        "--env-manager", "local",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip


def environment(uri: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(uri)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken now, rather than after the model has loaded."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"--port {port} on {host}: cannot listen ({exc.strerror}); pass a free --port"
            ) from None


def serve(
    name: str,
    alias: str = CHAMPION,
    *,
    host: str = "127.0.0.1",
    port: int = 5001,
    workers: int = 1,
    uri: str | None = None,
) -> NoReturn:
    """Replace this process with the scoring server for `models:/NAME@alias`."""
    version = resolve(name, alias, uri)
    check_port(host, port)
    print(
        f"serving {name} version {version} (@{alias}) at http://{host}:{port}/invocations",
        file=sys.stderr,
        flush=True,
    )
    # exec: signals (Ctrl-C, a supervisor's SIGTERM) reach the server directly.
    os.execve(
        sys.executable,
        command(f"models:/{name}/{version}", host, port, workers),
        environment(uri),
    )
