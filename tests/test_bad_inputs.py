"""Hostile or broken input through the real CLI: one line, exit 2, nothing half-written."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

FEWSHOT = [sys.executable, "-m", "fewshot.cli"]


def fewshot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FEWSHOT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, start: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {start}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, pixels: bytes) -> bytes:
    """A grey PNG with this header and this compressed payload, every checksum valid."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )


BOMB = png_declaring(60_000, 60_000, b"\0" * 100)  # 3.6 gigapixels declared, 100 bytes held
CORRUPT = png_declaring(20, 20, b"\x09" * 21 * 20)  # valid checksums, no valid row filter


def good_png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20, 20), level).save(buffer, format="PNG")
    return buffer.getvalue()


def folder_tree(root: Path, bad: bytes) -> Path:
    """ROOT/class_i/*.png for 10 classes, with `bad` as one image of class_3."""
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(3):
            (root / f"class_{c}" / f"{i}.png").write_bytes(good_png(20 * c + i))
    (root / "class_3" / "1.png").write_bytes(bad)
    return root


@pytest.mark.parametrize(("bad", "name"), [(BOMB, "bomb"), (CORRUPT, "corrupt")])
def test_a_bad_png_is_named_and_no_store_is_written(tmp_path, bad, name):
    folder_tree(tmp_path / "tree", bad)
    result = fewshot("data", "prepare", "folder", "--root", "tree", "--out", "out", cwd=tmp_path)
    one_line_error(result, f"{Path('tree/class_3/1.png')}: not a readable image")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tree"]  # no staging directory left


def test_a_bomb_in_an_omniglot_zip_is_named(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "images_background_small1.zip", "w") as archive:
        for c in range(5):
            for i in range(2):
                member = f"images_background_small1/Script/character{c:02d}/{i}.png"
                archive.writestr(member, good_png(10 * c + i))
        archive.writestr("images_background_small1/Script/character09/0.png", BOMB)
    args = ["--out", "omni", "--from-zip", "images_background_small1.zip", "--partial"]
    result = fewshot("data", "prepare", "omniglot", *args, cwd=tmp_path)
    one_line_error(
        result,
        "images_background_small1.zip:images_background_small1/Script/character09/0.png: "
        "not a readable image (",
    )
    assert not (tmp_path / "omni").exists()


@pytest.mark.parametrize(("bad", "name"), [(BOMB, "bomb"), (CORRUPT, "corrupt")])
def test_predict_names_the_bad_query_file(tmp_path, bad, name):
    for label in ("a", "b"):
        (tmp_path / "support" / label).mkdir(parents=True)
        (tmp_path / "support" / label / "1.png").write_bytes(good_png(100))
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "0.png").write_bytes(good_png(50))
    (tmp_path / "query" / f"{name}.png").write_bytes(bad)
    args = ["--model", "models:/m@champion", "--support", "support", "--query", "query"]
    result = fewshot("predict", *args, cwd=tmp_path)
    one_line_error(result, f"{Path('query') / f'{name}.png'}: not a readable image")
    assert "query_images[" not in result.stderr  # the file, not its index in the request


def test_stale_staging_of_a_killed_prepare_is_cleared(tmp_path):
    folder_tree(tmp_path / "tree", good_png(7))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".out.partial-{dead}"
    (stale / "split=train").mkdir(parents=True)
    running = tmp_path / f".out.partial-{os.getpid()}"  # a conversion still going on
    running.mkdir()
    result = fewshot("data", "prepare", "folder", "--root", "tree", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and running.is_dir()
    assert (tmp_path / "out" / "manifest.json").is_file()


def release_pickle(path: Path) -> None:
    """A pickle calling the allowed builtins.bytearray with a size: 1 PB if it ran."""
    path.write_bytes(b"\x80\x02cbuiltins\nbytearray\n" + pickle.dumps(10**15, 2)[2:-1] + b"\x85R.")


def test_cli_mistakes_are_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text('{"name": "x", "spl')
    (tmp_path / "configs").mkdir()
    (tmp_path / "pickles").mkdir()
    for split in ("train", "val", "test"):
        release_pickle(tmp_path / "pickles" / f"mini-imagenet-cache-{split}.pkl")
    folder_tree(tmp_path / "tree", good_png(7))
    long_name = "n" * 300
    cases = [
        (["data", "prepare", "folder", "--root", "tree", "--out", "file"], "--out file: is a file"),
        (["data", "info", "store"], f"{Path('store/manifest.json')}: not a readable manifest"),
        (["train", "--set", "data.path=store"], f"{Path('store/manifest.json')}: not a readable"),
        (["train", "--set", f"name={long_name}"], "name: use 1 to 100 letters"),
        (["serve", "m", "--port", "70000"], "--port 70000: not a TCP port"),
        (["serve", "m", "--port", "-1"], "--port -1: not a TCP port"),
        (["train", "--config", "configs"], "config file configs is a directory"),
        (
            ["data", "prepare", "mini-imagenet", "--out", "mini", "--from-pickles", "pickles"],
            f"{Path('pickles/mini-imagenet-cache-train.pkl')}: not a readable release pickle "
            "(it asks for bytearray(1000000000000000)",
        ),
    ]
    for args, start in cases:
        one_line_error(fewshot(*args, cwd=tmp_path), start)
    assert (tmp_path / "file").read_text() == "not a directory"
    assert (tmp_path / "store" / "manifest.json").read_text() == '{"name": "x", "spl'


def test_training_mistakes_are_one_line_before_anything_is_written(tmp_path, synthetic_store):
    (tmp_path / "file").write_text("not a directory")
    # A store the run could train on, so that the one bad setting is what is refused.
    store = ["--set", f"data.path={synthetic_store}", "--set", "episode.q_query=3"]
    cases = [
        (["--set", "seed=-1"], "seed: must be >= 0 (got -1)"),
        (["--set", "seed=99999999999999999999"], "seed: must be <= 4294967295"),
        ([*store, "--set", "train.output_dir=file"], "train.output_dir: file is a file"),
        (
            [*store, "--set", "train.threads=1000"],
            "train.threads: 1000 but this process may use",
        ),
        (
            ["--set", "registry.register=true", "--set", "registry.name=.."],
            "registry.name: use 1 to 100 letters, digits, _, - and ., not starting with .",
        ),
    ]
    for args, start in cases:
        one_line_error(fewshot("train", *args, cwd=tmp_path), start)
    # `fewshot register` takes a model name by the same rule as registry.name.
    register = fewshot("register", "--run", "0" * 32, "--name", ".", cwd=tmp_path)
    one_line_error(register, "model name '.': use 1 to 100 letters, digits, _, - and .")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no runs/, no mlflow.db
    assert (tmp_path / "file").read_text() == "not a directory"
