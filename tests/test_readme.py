"""The README is a manual, and what it says is kept true here: its "your own images"
recipe runs as written (with tiny settings appended), its command table names every
command the CLI registers, every `fewshot` line it shows parses, its links resolve, and
its other claims (the tune file, the cluster's secrets, what `make test` needs, Ray
Serve's batching in docs/serving.md) match the code."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from fewshot.cli import app
from fewshot.jobs import split_command

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
FEWSHOT = [sys.executable, "-m", "fewshot.cli"]

# Appended to the recipe's own lines, so that it trains and tests in seconds: later
# `--set`s and options win over the README's (see the Configuration section).
TINY = {
    "train": [
        "--set",
        "train.steps=2",
        "--set",
        "data.image_size=16",
        "--set",
        "backbone.width=8",
        "--set",
        "episode.q_query=2",
        "--set",
        "episode.meta_batch=1",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.val_episodes=2",
        "--set",
        "evaluate.episodes=5",
    ],
    "evaluate": ["--episodes", "10"],
}
TINY_IMAGES_PER_CLASS = 4  # k_shot 1 + q_query 2, and one to spare


def section(heading: str, text: str = README) -> str:
    """The text under a markdown heading, up to the next heading of its level or higher."""
    level = len(heading) - len(heading.lstrip("#"))
    start = re.search(rf"^{re.escape(heading)}\n", text, re.M)
    assert start, f"no heading {heading!r}"
    kept, fenced = [], False
    for line in text[start.end() :].splitlines(keepends=True):
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        kept.append(line)
    return "".join(kept)


def blocks(text: str, language: str = "bash") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def command_lines(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments out."""
    joined = block.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def setting(words: list[str], key: str) -> str:
    (value,) = [w.split("=", 1)[1] for w in words if w.startswith(f"{key}=")]
    return value


# --- the "your own images" recipe, run -------------------------------------------------


def draw_images(root: Path, classes: int, per_class: int) -> None:
    """A class per folder: a filled shape of its own place and colour, jittered a pixel
    or two per image."""
    from PIL import Image, ImageDraw

    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (24, 24), "white")
            x, y = 2 + (c % 5) * 4 + i % 2, 2 + (c // 5) * 4 + i // 2
            colour = (40 * (c % 6), 255 - 30 * (c % 8), 60 * (c % 4))
            ImageDraw.Draw(image).rectangle([x, y, x + 6, y + 6], fill=colour)
            image.save(folder / f"{i}.png")


def classes_needed(ratios: str, n_way: int) -> int:
    """Enough classes for every split of `--ratios` to hold an n_way episode."""
    fractions = [float(r) for r in ratios.split(",")]
    return math.ceil(n_way * sum(fractions) / min(fractions))


def test_your_own_images_recipe_runs_as_written(tmp_path):
    (block,) = blocks(section("### Your own images"))
    lines = command_lines(block)
    assert [w[:3] for w in lines] == [
        ["fewshot", "data", "prepare"],
        ["fewshot", "data", "info"],
        ["fewshot", "train", "--set"],
        ["fewshot", "evaluate", "--run"],
    ]
    prepare, info, train, evaluate = lines
    root, store = option(prepare, "--root"), option(prepare, "--out")
    assert option(info, "info") == store and setting(train, "data.path") == store
    run_dir = Path("runs") / setting(train, "name")
    assert option(evaluate, "--run") == run_dir.as_posix()
    n_way = int(setting(train, "episode.n_way"))
    classes = classes_needed(option(prepare, "--ratios"), n_way)
    # The block's comment: the classes these ratios need, and the default queries.
    from fewshot.config import EpisodeConfig

    assert f"({n_way} here: {classes} classes or more" in block
    assert f"k_shot + q_query images (1 + {EpisodeConfig().q_query} unless" in block
    draw_images(tmp_path / root, classes, TINY_IMAGES_PER_CLASS)

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["COLUMNS"] = "200"  # rich tables unwrapped
    outputs = []
    for words in lines:
        extra = TINY.get(words[1], [])
        result = subprocess.run(
            [*FEWSHOT, *words[1:], *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{shlex.join(words)}:\n{result.stderr}"
        outputs.append(result.stdout)

    # What the recipe's paragraph promises.
    assert (tmp_path / store / "manifest.json").is_file()
    for name in ("config.yaml", "model.pt", "mlflow_run_id"):
        assert (tmp_path / run_dir / name).is_file(), name
    accuracy = re.search(r"(\d+\.\d+) \+- (\d+\.\d+)%", outputs[-1])
    assert accuracy and 0 <= float(accuracy.group(1)) <= 100, outputs[-1]
    assert f"{n_way}-way 1-shot" in outputs[-1]
    assert (tmp_path / "mlflow.db").is_file()  # the working directory's store, as it says
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run((tmp_path / run_dir / "mlflow_run_id").read_text().strip())
    assert "test_acc" in run.data.metrics


# --- the command table and every command line shown ------------------------------------


def registered(typer_app: typer.Typer, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every command and group path of the app, walked from its registrations."""
    found = set()
    for command in typer_app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        found.add((*prefix, name))
    for group in typer_app.registered_groups:
        name = group.name or group.typer_instance.info.name
        found.add((*prefix, name))
        found |= registered(group.typer_instance, (*prefix, name))
    return found


def table_commands() -> list[str]:
    """First cells of the command table: `fewshot ...` usages."""
    table = section("## Command line")
    return re.findall(r"^\| `(fewshot [^`]*)` \|", table, re.M)


def named_paths(usage: str) -> set[tuple[str, ...]]:
    """The command paths a usage names: its leading lower-case words, `a\\|b` either."""
    paths: list[tuple[str, ...]] = [()]
    for word in usage.split()[1:]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*(\\\|[a-z][a-z0-9-]*)*", word):
            break
        paths = [(*p, alternative) for p in paths for alternative in word.split("\\|")]
    return {p[:n] for p in paths for n in range(1, len(p) + 1)}


def test_command_table_names_every_registered_command_and_nothing_else():
    named = set().union(*(named_paths(u) for u in table_commands()))
    commands = registered(app)
    assert sorted(commands - named) == []
    assert sorted(named - commands) == []


def click_command(path: list[str]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def options_of(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def shown_fewshot_lines() -> list[list[str]]:
    """Every `fewshot` command in the bash blocks of the manual and docs/."""
    texts = [README, *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))]
    return [
        words
        for text in texts
        for block in blocks(text)
        for words in command_lines(block)
        if words[0] == "fewshot"
    ]


@pytest.mark.parametrize("usage", table_commands())
def test_every_option_in_the_command_table_exists(usage):
    (path, *_) = sorted(named_paths(usage), key=len, reverse=True)
    for alternative in sorted(p for p in named_paths(usage) if len(p) == len(path)):
        known = options_of(click_command(list(alternative)))
        shown = {w.split("=")[0] for w in re.findall(r"--[a-z][a-z0-9-]*", usage)}
        assert sorted(shown - known) == [], usage


def test_every_fewshot_line_shown_parses():
    lines = shown_fewshot_lines()
    assert len(lines) >= 15
    for words in lines:
        path = []
        for word in words[1:]:
            command = click_command(path)
            if not hasattr(command, "commands") or word not in command.commands:
                break
            path.append(word)
        command = click_command(path)
        assert not hasattr(command, "commands"), f"{shlex.join(words)}: names no command"
        known = options_of(command)
        if path == ["submit"]:  # `fewshot submit COMMAND [ARGS]`: ARGS are COMMAND's
            job, _ = split_command(words[2:])
            known |= options_of(click_command(job.split()))
        shown = {w.split("=")[0] for w in words if w.startswith("--")}
        assert sorted(shown - known) == [], shlex.join(words)


def test_make_targets_shown_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    shown = set(re.findall(r"`make ([a-z][a-z-]*)`", README))
    shown |= {w[1] for b in blocks(README) for w in command_lines(b) if w[0] == "make"}
    assert shown and sorted(shown - targets) == []


# --- links ------------------------------------------------------------------------------

MANUALS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MANUALS.append(ROOT / "benchmarks" / "results" / "README.md")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", MANUALS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert broken == []


def test_the_manual_links_every_doc():
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\(docs/([^)#]+)", README))
    assert docs and sorted(docs - linked) == []


# --- the other claims -------------------------------------------------------------------


def test_tune_file_shown_is_valid_and_named_by_its_commands(tmp_path, monkeypatch):
    from fewshot.tune.space import read_tune_file

    text = section("### A search")
    (tune_yaml,) = blocks(text, "yaml")
    (block,) = blocks(text)
    config, resume = command_lines(block)
    (tmp_path / option(config, "--config")).write_text(tune_yaml)
    monkeypatch.chdir(tmp_path)
    spec = read_tune_file(option(config, "--config"))
    assert option(resume, "--resume") == spec.name
    assert spec.base.data.path == tmp_path / "data" / "mine"


def test_cluster_secrets_command_writes_a_private_env_file(tmp_path):
    (block,) = blocks(section("### A cluster"))
    secrets = block[: block.index("ray up")]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(["bash", "-euc", secrets], env=env, check=True, timeout=60)
    path = tmp_path / ".fewshot" / "mlflow.env"
    values = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert sorted(values) == [
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_USERNAME",
    ]
    assert values["MLFLOW_TRACKING_PASSWORD"] == values["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert len(values["MLFLOW_TRACKING_PASSWORD"]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cluster_yaml = (ROOT / "cluster.yaml").read_text()
    assert "~/.fewshot/mlflow.env" in cluster_yaml  # what `ray up` copies to every node


def test_make_test_needs_what_the_manual_says():
    spec = importlib.util.spec_from_file_location("_tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    said = re.search(r"in `(\.\./[^`]+)` beside the repository", README).group(1)
    assert (ROOT / said).resolve() == conftest.SHARED.resolve()
    assert f"`{conftest.SMALL1.name}`" in README and f"`{conftest.SMALL2.name}`" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^OMNIGLOT_DIR \?= {re.escape(said)}$", makefile, re.M)


def test_ray_serve_batching_in_the_docs_is_the_codes():
    source = (ROOT / "platform" / "fewshot" / "serve" / "ray_app.py").read_text()
    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("MAX_BATCH", "BATCH_WAIT_S")
    }
    said = (
        f"at most {constants['MAX_BATCH']} requests, waiting at most\n"
        f"  {constants['BATCH_WAIT_S'] * 1000:g} ms to fill a batch"
    )
    assert said in (ROOT / "docs" / "serving.md").read_text()


def test_repository_paths_named_exist():
    """Every `jobs/...`, `platform/...`, `tests/...`, `benchmarks/...` or `docs/...` path the
    manual names in code (a glob matches at least one file)."""
    named = re.findall(r"`((?:jobs|platform|tests|benchmarks|docs)/[^`\s]*)`", README)
    named += re.findall(r"\b((?:jobs|tests)/[\w/.-]+\.(?:py|yaml))", README)
    assert len(named) >= 5
    missing = [n for n in named if not any(ROOT.glob(n.rstrip("/")))]
    assert missing == []


def test_configuration_table_names_every_section_and_key():
    from fewshot.config import Config

    rows = re.findall(r"^\| (`[^|]*`) \| (.*) \|$", section("## Configuration"), re.M)
    cells = {name: keys for names, keys in rows for name in re.findall(r"`(\w+)`", names)}
    assert sorted(cells) == sorted(Config.model_fields)
    missing = []
    for name, field in Config.model_fields.items():
        for key in getattr(field.annotation, "model_fields", {}):
            if f"`{key}`" not in cells[name]:
                missing.append(f"{name}.{key}")
    assert missing == []


def test_the_gallery_recipes_requests_are_what_the_servers_take():
    """Each curl of the galleries recipe, its `$(base64 ...)` an image's base64, is a
    request the servers' checks take for its route (that the class survives a restart is
    tests/serve/test_galleries.py's)."""
    from fewshot.serve.galleries import route
    from fewshot.serve.limits import Limits, check_request

    (block,) = blocks(section("### Galleries"))
    curls = [words for words in command_lines(block) if words[0] == "curl"]
    assert len(curls) == 2
    for words in curls:
        (url,) = [w for w in words if w.startswith("localhost:5001/galleries/")]
        name, kind = route(url.removeprefix("localhost:5001"))
        assert name == "shop"
        body = re.sub(r"\$\(base64 -w0 [^)]+\)", "iVBORw0KGgo=", option(words, "-d"))
        assert option(words, "-H") == "Content-Type: application/json"
        check_request(body.encode(), "application/json", Limits(), kind)


def test_the_method_advice_follows_the_folds_table():
    """The README's order of methods is the folds bench's (each method by its best row),
    and the mixup rows do not beat plain ProtoNet there."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "methods_folds.json").read_text())
    error = {r["name"]: 1 - r["accuracy"]["20w1s"][0] for r in rows}
    best: dict[str, float] = {}
    for name, e in error.items():
        family = name.split()[0].rstrip(",")
        best[family] = min(e, best.get(family, 1.0))
    advice = README.split("**Which method**:")[1].split("\n- **")[0]
    said = re.findall(r"\b(CFN|MTL|TRML|Subspace|ProtoNet|MAML)\b", advice)
    order = list(dict.fromkeys(said))[: len(best)]
    assert order == sorted(best, key=best.get)
    assert min(error["ProtoNet + MLTI"], error["ProtoNet + DATG"]) >= error["ProtoNet"]


def test_the_headline_figure_is_the_fold_mean_of_what_make_omniglot_trains():
    """The README's headline figure is the folds bench's row of an ensemble of the same
    members as recipes/omniglot_members.yaml (their settings other than the length of
    training, which `make omniglot` fits to its budget)."""

    def settings(member: dict) -> dict:
        return {k: v for k, v in member.items() if not k.startswith("train.")}

    recipes = ROOT / "platform" / "fewshot" / "recipes"
    members = yaml.safe_load((recipes / "omniglot_members.yaml").read_text())["members"]
    bench = ROOT / "jobs" / "configs" / "bench" / "omniglot_levers.yaml"
    rows = yaml.safe_load(bench.read_text())["rows"]
    wanted = [settings(m["set"]) for m in members]
    (row,) = [r for r in rows if [settings(s) for s in r.get("ensemble", [])] == wanted]
    results = json.loads((ROOT / "benchmarks" / "results" / "omniglot_levers.json").read_text())
    (measured,) = [r for r in results if r["name"] == row["name"]]
    mean, ci95, _ = measured["accuracy"]["20w1s"]
    section = README.split("### The Omniglot headline model")[1].split("\n### ")[0]
    assert f"**{100 * (1 - mean):.2f} ± {100 * ci95:.2f}%** errors" in section
