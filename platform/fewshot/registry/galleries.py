"""Galleries: named, versioned sets of classes with their support images, kept in the
MLflow tracking store and its artifact store, so a taught class survives any server.

Storage (the one place that writes and reads it):

    experiment  fewshot-galleries/NAME     one per gallery, tagged fewshot.gallery=NAME
      run       one per version            tags fewshot.gallery=NAME,
                                                fewshot.gallery.version=V,
                                                fewshot.model=MODEL URI,
                                                fewshot.gallery.change=what V changed,
                                                fewshot.gallery.classes=N, ...images=M
                  artifact gallery.parquet  rows (label: string, image: binary, sha256:
                                            string), the PNG or JPEG bytes as given,
                                            classes in label order, images in the order
                                            they were added
                  param fewshot.gallery.next = the run id of version V+1, once it exists

The images are kept, not only embeddings, so another model version can embed them again;
`entries` lists a version's images in that stable order (the seam for an embeddings cache
keyed by gallery version and model version).

Why an experiment per gallery, not one experiment for all: every change is a new version
and none may be lost when two clients change a gallery at once, so each version needs a
compare-and-set, and the tracking store has two: an experiment name is unique (creating
`fewshot-galleries/NAME` twice fails), and a run's param cannot change once logged. So
`create` claims the name by creating the experiment, and version V+1 is claimed by
logging `fewshot.gallery.next` on version V's run: of two writers on top of V, one
claims it and the other deletes its run, reads the new latest version and applies its
change again. A version's run is complete (artifact and tags) before it is claimed, so a
reader never sees half a version, and a writer that dies leaves at most an unclaimed run
that no version points to. Earlier versions are never changed: `rollback` writes a new
version with an old one's content.

Limits, from the environment (defaults in `Limits`): FEWSHOT_GALLERY_MAX_CLASSES,
FEWSHOT_GALLERY_MAX_IMAGES (in the whole gallery), FEWSHOT_GALLERY_MAX_LABEL_CHARS.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from fewshot.config import limits_from_env
from fewshot.data.decode import check_image
from fewshot.errors import RegistryError, RequestError
from fewshot.registry.versions import alias_version, check_name, connect, load

PREFIX = "fewshot-galleries/"  # + NAME: the gallery's experiment
ARTIFACT = "gallery.parquet"
TAG = "fewshot.gallery"
VERSION, MODEL, CHANGE = f"{TAG}.version", "fewshot.model", f"{TAG}.change"
CLASSES, IMAGES = f"{TAG}.classes", f"{TAG}.images"
NEXT = f"{TAG}.next"  # param of version V's run: the run id of version V+1
SCHEMA = pa.schema([("label", pa.string()), ("image", pa.binary()), ("sha256", pa.string())])
ATTEMPTS = 20  # writers racing on one gallery: tries before giving up


@dataclass(frozen=True)
class Limits:
    max_classes: int = 1000
    max_images: int = 20000  # in the whole gallery
    max_label_chars: int = 200  # as the servers' FEWSHOT_SERVE_MAX_LABEL_CHARS

    @staticmethod
    def variable(name: str) -> str:
        return f"FEWSHOT_GALLERY_{name.upper()}"

    @classmethod
    def from_env(cls) -> Limits:
        return limits_from_env(cls, cls.variable, RegistryError)


@dataclass(frozen=True)
class Entry:
    label: str
    image: bytes  # encoded, as it was added
    sha256: str


@dataclass(frozen=True)
class Version:
    gallery: str
    version: int
    model: str  # the model URI the gallery was created for
    change: str
    classes: int
    images: int
    run_id: str
    created_ms: int


def entry(label: str, image: bytes) -> Entry:
    return Entry(label, image, hashlib.sha256(image).hexdigest())


def labels(entries: Sequence[Entry]) -> list[str]:
    """The distinct labels, in order."""
    return list(dict.fromkeys(e.label for e in entries))


# Reading ------------------------------------------------------------------------------


class UnknownGallery(RegistryError):
    """No gallery of that name (a server's 404)."""


def _experiment(client: MlflowClient, name: str):
    check_name(name)
    experiment = client.get_experiment_by_name(PREFIX + name)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise UnknownGallery(
            f"gallery {name!r} does not exist; create it with "
            f"`fewshot gallery create {name} --model URI --support DIR`"
        )
    return experiment


def _version(name: str, run: Run) -> Version:
    tags = run.data.tags
    return Version(
        name,
        int(tags[VERSION]),
        tags[MODEL],
        tags[CHANGE],
        int(tags[CLASSES]),
        int(tags[IMAGES]),
        run.info.run_id,
        run.info.start_time,
    )


def _history(client: MlflowClient, name: str) -> list[Version]:
    """Versions 1, 2, ...: version 1's run, then each claimed successor in turn (a run no
    version claimed is a writer's that lost a race, and is not part of the gallery)."""
    experiment = _experiment(client, name)
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, page_token=token
        )
        runs += page
        if not (token := page.token):
            break
    by_id = {r.info.run_id: r for r in runs}
    run = next((r for r in runs if r.data.tags.get(VERSION) == "1"), None)
    if run is None:
        raise RegistryError(
            f"gallery {name!r} has no version 1: it is being created, or its creation was "
            f"interrupted (rename experiment {experiment.experiment_id} away with "
            "`mlflow experiments rename` and create it again)"
        )
    chain = [run]
    while (following := by_id.get(chain[-1].data.params.get(NEXT, ""))) is not None:
        chain.append(following)
    return [_version(name, r) for r in chain]


def history(name: str, uri: str | None = None) -> list[Version]:
    """Every version of gallery `name`, oldest first."""
    return _history(connect(uri), name)


def get(name: str, version: int | None = None, uri: str | None = None) -> Version:
    """Version `version` of gallery `name` (default: its latest)."""
    versions = history(name, uri)
    if version is None:
        return versions[-1]
    if not 1 <= version <= len(versions):
        raise RegistryError(
            f"gallery {name!r} has no version {version}; it has 1 to {len(versions)} "
            f"(`fewshot gallery show {name}`)"
        )
    return versions[version - 1]


def galleries(uri: str | None = None) -> list[Version]:
    """The latest version of every gallery, by name."""
    client = connect(uri)
    found = client.search_experiments(filter_string=f"name LIKE '{PREFIX}%'")
    names = sorted(e.tags[TAG] for e in found if TAG in e.tags)
    return [_history(client, name)[-1] for name in names]


def following(version: Version, uri: str | None = None) -> Version:
    """The latest version of `version`'s gallery, found from `version` by its claimed
    successors: one lookup when nothing changed, so a server can ask it every second."""
    client = connect(uri)
    run = client.get_run(version.run_id)
    while successor := run.data.params.get(NEXT):
        run = client.get_run(successor)
    return version if run.info.run_id == version.run_id else _version(version.gallery, run)


def model_name(model_uri: str) -> str | None:
    """The registered model a model URI names (`models:/NAME@ALIAS`, `models:/NAME/V`), or
    None for a run's or a folder's."""
    path = model_uri.removeprefix("models:/")
    return None if path == model_uri else path.partition("@")[0].partition("/")[0]


def for_model(name: str, uri: str | None = None) -> list[Version]:
    """The latest version of every gallery created for registered model `name`: what a
    server of that model loads at start."""
    return [v for v in galleries(uri) if model_name(v.model) == name]


def entries(version: Version, uri: str | None = None) -> list[Entry]:
    """The version's images with their labels, in the gallery's stable order: classes in
    label order, each class's images in the order they were added."""
    client = connect(uri)
    with tempfile.TemporaryDirectory(prefix="fewshot-gallery-") as scratch:
        table = pq.read_table(client.download_artifacts(version.run_id, ARTIFACT, scratch))
    rows = table.select(SCHEMA.names).to_pylist()
    return [Entry(r["label"], r["image"], r["sha256"]) for r in rows]


def support(version: Version, uri: str | None = None) -> tuple[list[bytes], list[str]]:
    """The version as a support set: (encoded images, labels), as `read_support` gives."""
    found = entries(version, uri)
    return [e.image for e in found], [e.label for e in found]


def pinned(model_uri: str, uri: str | None = None) -> tuple[str, str | None]:
    """`models:/NAME@ALIAS` -> (`models:/NAME/V`, V), so that what is loaded is the version
    named even if the alias moves meanwhile; `models:/NAME/V` -> (it, V); any other URI
    (a run's, a folder) -> (it, None)."""
    path = model_uri.removeprefix("models:/")
    if path == model_uri:
        return model_uri, None
    name, at, alias = path.partition("@")
    if at:
        version = alias_version(connect(uri), name, alias)
        if version is None:
            raise RegistryError(
                f"model {model_uri}: alias {alias!r} points to no version of {name!r}; "
                f"see `fewshot models list {name}`"
            )
        return f"models:/{name}/{version}", version
    name, _, version = path.partition("/")
    return model_uri, version if version.isdigit() else None


# Checking -----------------------------------------------------------------------------


def checked(label: str, images: Sequence[bytes], limits: Limits) -> list[Entry]:
    """One class's new entries, refused when the label or an image is unusable."""
    if not label.strip() or len(label) > limits.max_label_chars or "\n" in label:
        raise RequestError(
            f"label {label[:60]!r}: give a one-line label of 1 to {limits.max_label_chars} "
            f"characters (FEWSHOT_GALLERY_MAX_LABEL_CHARS)"
        )
    if not images:
        raise RequestError(f"class {label!r}: no images; give at least one image of it")
    for i, image in enumerate(images):
        check_image(image, f"class {label!r} image {i + 1}")
    return [entry(label, image) for image in images]


def _check_size(name: str, rows: list[Entry], limits: Limits) -> None:
    classes = len(labels(rows))
    if classes < 2:
        raise RequestError(
            f"gallery {name!r}: {classes} class(es) left; a gallery needs at least 2 "
            "to classify among"
        )
    if classes > limits.max_classes:
        raise RequestError(
            f"gallery {name!r}: {classes} classes, over the limit of {limits.max_classes}; "
            "raise FEWSHOT_GALLERY_MAX_CLASSES or remove classes"
        )
    if len(rows) > limits.max_images:
        raise RequestError(
            f"gallery {name!r}: {len(rows)} images, over the limit of {limits.max_images}; "
            "raise FEWSHOT_GALLERY_MAX_IMAGES or remove images"
        )


def check_model(name: str, model_uri: str, classes: int, uri: str | None = None) -> None:
    """Refuse a model that cannot answer a task of the gallery's `classes` (MAML answers
    only the way it was trained on)."""
    method = load(pinned(model_uri, uri)[0], uri).method
    if not method.answers_way(classes):
        raise RequestError(
            f"gallery {name!r}: {classes} classes, but model {model_uri} ({method.name}) "
            f"answers only {method.shape.n_way}-way tasks; keep {method.shape.n_way} "
            "classes or use a model trained for any way (e.g. protonet)"
        )


# Writing ------------------------------------------------------------------------------


def _sorted(rows: list[Entry]) -> list[Entry]:
    """Classes in label order, each class's images in the order given (a stable sort)."""
    return sorted(rows, key=lambda e: e.label)


def _write(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    number: int,
    model: str,
    change: str,
    rows: list[Entry],
) -> str:
    """A complete, unclaimed version run; returns its id."""
    tags = {
        TAG: name,
        VERSION: str(number),
        MODEL: model,
        CHANGE: change,
        CLASSES: str(len(labels(rows))),
        IMAGES: str(len(rows)),
    }
    run = client.create_run(experiment_id, tags=tags, run_name=f"{name}-v{number}")
    with tempfile.TemporaryDirectory(prefix="fewshot-gallery-") as scratch:
        path = Path(scratch) / ARTIFACT
        columns = {f: [getattr(e, f) for e in rows] for f in SCHEMA.names}
        pq.write_table(pa.table(columns, schema=SCHEMA), path)
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def _claim(client: MlflowClient, head: Version, run_id: str) -> bool:
    """Make run `run_id` the version after `head`, unless another run already is."""
    with contextlib.suppress(MlflowException):  # it exists, with another run's id
        client.log_param(head.run_id, NEXT, run_id)
    return client.get_run(head.run_id).data.params.get(NEXT) == run_id


def create(
    name: str,
    model: str,
    images: Sequence[bytes],
    image_labels: Sequence[str],
    uri: str | None = None,
) -> Version:
    """Gallery `name`, version 1: the classes of `image_labels` with their images, for
    `model` (checked to answer that many classes)."""
    check_name(name)
    client = connect(uri)
    if client.get_experiment_by_name(PREFIX + name) is not None:
        raise RegistryError(_exists(name))
    limits = Limits.from_env()
    grouped: dict[str, list[bytes]] = {}
    for image, label in zip(images, image_labels, strict=True):
        grouped.setdefault(label, []).append(image)
    rows = _sorted([e for label, group in grouped.items() for e in checked(label, group, limits)])
    _check_size(name, rows, limits)
    check_model(name, model, len(grouped), uri)
    try:
        experiment_id = client.create_experiment(PREFIX + name, tags={TAG: name, MODEL: model})
    except MlflowException:  # another client created it meanwhile
        raise RegistryError(_exists(name)) from None
    run_id = _write(client, experiment_id, name, 1, model, "created", rows)
    client.set_terminated(run_id)
    return _version(name, client.get_run(run_id))


def _exists(name: str) -> str:
    return (
        f"gallery {name!r} already exists; change it with `fewshot gallery add/remove "
        f"{name}` or see it with `fewshot gallery show {name}`"
    )


def _change(
    name: str,
    edit: Callable[[list[Entry]], tuple[list[Entry], str]],
    uri: str | None,
) -> Version:
    """A new latest version of gallery `name` whose rows are `edit(the latest version's rows)`
    (which returns them with a one-line description, or refuses). Retried on top of the
    newer version when another client's change landed first."""
    client = connect(uri)
    limits = Limits.from_env()
    answers: set[int] = set()  # class counts the gallery's model was checked to answer
    for _ in range(ATTEMPTS):
        head = _history(client, name)[-1]
        rows, change = edit(entries(head, uri))
        rows = _sorted(rows)
        _check_size(name, rows, limits)
        if (classes := len(labels(rows))) != head.classes and classes not in answers:
            check_model(name, head.model, classes, uri)
            answers.add(classes)
        experiment_id = client.get_run(head.run_id).info.experiment_id
        run_id = _write(client, experiment_id, name, head.version + 1, head.model, change, rows)
        if _claim(client, head, run_id):
            client.set_terminated(run_id)
            return _version(name, client.get_run(run_id))
        client.delete_run(run_id)
        time.sleep(random.uniform(0.05, 0.5))  # let the winner finish before reading
    raise RegistryError(
        f"gallery {name!r}: {ATTEMPTS} other changes landed while this one was written; "
        "run it again"
    )


def add(name: str, label: str, images: Sequence[bytes], uri: str | None = None) -> Version:
    """A new version with `images` added to class `label` (created if new); an image the
    class already holds (same bytes) is not added twice."""
    new = checked(label, images, Limits.from_env())

    def edit(rows: list[Entry]) -> tuple[list[Entry], str]:
        held = {e.sha256 for e in rows if e.label == label}
        fresh = list({e.sha256: e for e in new if e.sha256 not in held}.values())
        if not fresh:
            raise RequestError(
                f"class {label!r}: its {len(new)} image(s) are already in gallery {name!r}; "
                "nothing to add"
            )
        known = "to" if held else "as new class"
        return [*rows, *fresh], f"added {len(fresh)} image(s) {known} {label!r}"

    return _change(name, edit, uri)


def remove(name: str, label: str, uri: str | None = None) -> Version:
    """A new version without class `label`."""

    def edit(rows: list[Entry]) -> tuple[list[Entry], str]:
        kept = [e for e in rows if e.label != label]
        if len(kept) == len(rows):
            raise RequestError(
                f"class {label!r}: not in gallery {name!r} (classes {labels(rows)[:20]}); "
                f"see `fewshot gallery show {name}`"
            )
        return kept, f"removed {label!r} ({len(rows) - len(kept)} image(s))"

    return _change(name, edit, uri)


def rollback(name: str, version: int, uri: str | None = None) -> Version:
    """A new version whose content equals version `version`'s."""
    target = get(name, version, uri)

    def edit(_rows: list[Entry]) -> tuple[list[Entry], str]:
        return entries(target, uri), f"rolled back to version {version}"

    return _change(name, edit, uri)
