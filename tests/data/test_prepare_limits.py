"""`fewshot data prepare` refuses, in one line and before writing anything, a zip member
that inflates past the image limit (with bounded memory, whatever its header says) and an
--out where no store can be written."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from fewshot.data.decode import max_image_bytes, read_limited
from fewshot.data.sources import synthetic
from fewshot.errors import DataError

MEMBER = "images_background_bomb/Script/character01/0101_01.png"
INFLATED = 2**30  # what the member inflates to: 1 GiB of zeros
# Growth of the peak resident memory allowed past that of the imported CLI (~740 MB
# here, torch included): a quarter of the member. Reading the member whole costs it all.
GROWTH_KIB = 256 * 1024

# Runs the CLI in-process and prints its peak resident memory (KiB) after importing what
# the command imports, and at the end.
PEAK = """
import resource, sys
import fewshot.data.sources.omniglot
from fewshot.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.argv = ["fewshot", *sys.argv[1:]]
try:
    main()
finally:
    print("peak", base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """An Omniglot-layout zip of 5 MB whose one drawing inflates to 1 GiB, written a MiB at
    a time so that the test never holds it."""
    path = tmp_path_factory.mktemp("zips") / "images_background_bomb.zip"
    block = bytes(2**20)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open(MEMBER, "w") as member,
    ):
        for _ in range(INFLATED // len(block)):
            member.write(block)
    return path


def lying(bomb: Path, folder: Path) -> Path:
    """The bomb with both headers declaring 1,000 bytes (and their CRC): under the limit."""
    data = bytearray(bomb.read_bytes())
    with zipfile.ZipFile(bomb) as archive:
        (info,) = archive.infolist()
    sizes = (zlib.crc32(bytes(1000)), info.compress_size, 1000)
    struct.pack_into("<III", data, info.header_offset + 14, *sizes)  # local header
    struct.pack_into("<III", data, data.rindex(b"PK\x01\x02") + 16, *sizes)  # central one
    path = folder / bomb.name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("header", ["honest", "lying"])
def test_a_zip_member_inflating_past_the_limit_costs_no_memory_and_writes_nothing(
    tmp_path, bomb, header
):
    source = bomb if header == "honest" else lying(bomb, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", PEAK, "data", "prepare", "omniglot"]
        + ["--from-zip", str(source), "--out", "omni"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    error = one_line_error(result)
    assert f"{source}:{MEMBER}: " in error
    if header == "honest":  # refused by its declared size, before inflating anything
        assert f"{INFLATED} bytes, over the limit of {max_image_bytes()} bytes" in error
    else:  # zipfile stops at the declared 1,000 bytes: zeros, not an image
        assert "not a readable image" in error
    base, peak = (int(v) for v in result.stdout.split()[-2:])
    assert peak - base < GROWTH_KIB, (base, peak)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if header == "honest" else [bomb.name])


def test_a_stream_is_read_only_up_to_the_limit(monkeypatch):
    """Whatever a header says, reading stops a chunk past the limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as a server lowers it
    assert max_image_bytes() == 8000
    stream = io.BytesIO(bytes(10**7))
    with pytest.raises(DataError, match=r"^x.png: \d+ or more bytes, over the limit of 8000 "):
        read_limited(stream, "x.png")
    assert stream.tell() <= 2**20  # one chunk of the 10 MB
    assert read_limited(io.BytesIO(bytes(8000)), "x.png") == bytes(8000)


@pytest.mark.parametrize(
    ("command", "out"),
    [
        (["synthetic"], "afile"),
        (["synthetic"], "afile/x"),
        # Refused before the source is looked at (it does not exist either).
        (["folder", "--root", "missing"], "afile/x"),
    ],
)
def test_an_out_that_is_or_lies_under_a_file_is_one_line(tmp_path, command, out):
    (tmp_path / "afile").write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "fewshot.cli", "data", "prepare", *command, "--out", out],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    what = "" if out == "afile" else "afile "
    assert one_line_error(result) == (
        f"error: --out {out}: {what}is a file, not a directory; choose another --out\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_the_library_refuses_an_out_under_a_file_too(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(DataError, match=r"^--out .*afile/x: .*afile is a file, not a directory"):
        synthetic.prepare(tmp_path / "afile" / "x", classes_per_group=2, images_per_class=2)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
