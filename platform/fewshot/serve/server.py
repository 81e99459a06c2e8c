"""`fewshot serve`: MLflow's scoring server for the version an alias points to.

The alias is resolved once, at start, and the server is started on that version
(`models:/NAME/V`), so what it serves is what it printed; a newly promoted
champion is picked up by starting a server again (see docs/serving.md for a rollover
without downtime). The server is MLflow's scoring server app, as `mlflow models serve
--env-manager local` runs it, but behind `serve.limits.Guard`, which refuses a request
past a limit before MLflow reads it, with the gallery routes (serve/galleries.py) in
front of it: uvicorn runs `fewshot.serve.app:app` in this environment, the model
downloaded once here. Every answer names the test views computed in the header
`x-fewshot-test-views`. `Options` are the settings of both `fewshot serve` paths, this
one and Ray Serve's (serve/ray_app.py).
"""

from __future__ import annotations

import errno
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import mlflow

from fewshot.errors import RegistryError, ServeError
from fewshot.models.views import VIEW_SHIFTS
from fewshot.registry.versions import CHAMPION, alias_version, connect, current, require_model
from fewshot.serve.limits import Limits
from fewshot.tracking import tracking_uri

# What `environment` tells the server's processes of the model they serve.
MODEL_NAME, MODEL_VERSION = "FEWSHOT_SERVE_MODEL", "FEWSHOT_SERVE_MODEL_VERSION"
TEST_VIEWS = "FEWSHOT_SERVE_TEST_VIEWS"  # --test-views, when given
POLL_S = 2.0  # how often a server asks whether its galleries changed


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


def command(host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "fewshot.serve.app:app",
    ]  # fmt: skip


def environment(
    name: str, version: str, limits: Limits, uri: str | None = None, test_views: int | None = None
) -> dict[str, str]:
    """What the server's processes need: the local copy of version `version` of model
    `name` (where MLflow's app reads it), its name and version (for the galleries),
    MLflow's request timeout, the tracking URI, the limits and --test-views."""
    from mlflow.pyfunc import scoring_server

    with current(uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}")
    _, env = scoring_server.get_cmd(local)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(uri)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    views = {TEST_VIEWS: str(test_views)} if test_views else {}
    return {**env, **limits.env(), MODEL_NAME: name, MODEL_VERSION: version, **views}


@dataclass(frozen=True)
class Options:
    """How `fewshot serve` listens and, with --ray, scales and caches. Both servers `check`
    them all before the model is looked up or Ray starts: a value that cannot work is then
    one line, not a traceback after minutes of start-up, nor a server that starts and
    refuses every request (a cache of -1 MB) or forgets every support set at once."""

    host: str = "127.0.0.1"
    port: int = 5001
    workers: int = 1  # scoring server processes
    replicas: int = 1  # --ray
    autoscale: tuple[int, int] | None = None  # --ray: MIN, MAX replicas
    cache_mb: float = 256  # --ray
    cache_ttl_s: float = 3600  # --ray
    cpus_per_replica: float = 1.0  # --ray
    test_views: int | None = None  # None: as the model was trained

    def check(self) -> None:
        for option, count in (("--workers", self.workers), ("--replicas", self.replicas)):
            if count < 1:
                raise ServeError(f"{option} {count}: give a whole number >= 1")
        amounts = (
            ("--cache-mb", self.cache_mb),
            ("--cache-ttl", self.cache_ttl_s),
            ("--cpus-per-replica", self.cpus_per_replica),
        )
        for option, amount in amounts:
            if not (math.isfinite(amount) and amount > 0):
                raise ServeError(f"{option} {amount}: give a finite number > 0")
        if self.test_views is not None and not 1 <= self.test_views <= len(VIEW_SHIFTS):
            raise ServeError(f"--test-views {self.test_views}: give 1 (none) to {len(VIEW_SHIFTS)}")
        check_port(self.host, self.port)


def check_port(host: str, port: int) -> None:
    """Refuse a port that is no TCP port, or that is taken now (rather than after the model
    has loaded), and a host that is no address of this machine."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: not a TCP port; pass one from 1 to 65535, e.g. 5001")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(
            f"--host {host!r}: not an address ({exc.strerror}); pass one of this machine, "
            "e.g. 127.0.0.1"
        ) from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServeError(
                    f"--host {host!r}: not an address of this machine; pass one that is, "
                    "e.g. 127.0.0.1"
                ) from None
            raise ServeError(
                f"--port {port} on {host}: cannot listen ({exc.strerror}); pass a free --port"
            ) from None


def serve(
    name: str, alias: str = CHAMPION, options: Options = Options(), uri: str | None = None
) -> NoReturn:
    """Replace this process with the scoring server for `models:/NAME@alias`."""
    options.check()
    limits = Limits.from_env()
    version = resolve(name, alias, uri)
    env = environment(name, version, limits, uri, options.test_views)
    host, port = options.host, options.port
    print(
        f"serving {name} version {version} (@{alias}) at http://{host}:{port}/invocations",
        file=sys.stderr,
        flush=True,
    )
    # exec: signals (Ctrl-C, a supervisor's SIGTERM) reach the server directly.
    os.execve(sys.executable, command(host, port, options.workers), env)
