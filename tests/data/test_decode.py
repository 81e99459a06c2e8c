"""Decoded up front or per episode: the same episodes, chosen by data.decode."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fewshot.config import load_config
from fewshot.data import store
from fewshot.data.decode import decode_image
from fewshot.data.episodes import EpisodeSampler
from fewshot.data.reader import EncodedImages, ImageSet, choose_decode, load_split
from fewshot.data.sources import synthetic
from fewshot.errors import ConfigError, DataError
from fewshot.streams import Stream
from fewshot.train.datasets import Datasets, decode_mode


def episodes(images: ImageSet, count: int = 6) -> list:
    sampler = EpisodeSampler(images, n_way=5, k_shot=2, q_query=3)
    return [sampler.episode(Stream.TRAIN, 3, step, 0) for step in range(count)]


def assert_same(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("size", [16, 64])  # resized from the store's 64 px, and not resized
def test_both_modes_give_identical_episodes(synthetic_store, size):
    memory = load_split(synthetic_store, "train", size, "memory")
    episode = load_split(synthetic_store, "train", size, "episode")
    assert isinstance(episode.images, EncodedImages) and not memory.encoded
    assert episode.images.shape == memory.images.shape
    assert_same(episodes(memory), episodes(episode))
    # A subset of classes (train_classes, val_groups) shares the bytes and still matches.
    subset = episode.take_classes([5, 1, 7, 3, 9, 0])
    assert subset.images.blobs is episode.images.blobs
    assert_same(episodes(memory.take_classes([5, 1, 7, 3, 9, 0])), episodes(subset))


def test_auto_decodes_up_front_only_within_the_budget(tiny_config):
    # The tiny store's train + val split decode to well under 1 MB at 16 px.
    assert decode_mode(tiny_config("data.memory_budget_gb=1")) == "memory"
    small = tiny_config("data.memory_budget_gb=0.0001")  # 100 kB
    assert decode_mode(small) == "episode"
    data = Datasets.load(small)
    assert data.train.encoded and data.val.encoded
    assert decode_mode(tiny_config()) == "memory"  # half the free memory: plenty
    assert decode_mode(tiny_config("data.decode=episode", "data.memory_budget_gb=1")) == "episode"
    assert choose_decode("auto", 10, 9) == "episode" and choose_decode("auto", 9, 9) == "memory"


def test_a_cap_lowers_the_automatic_budget(tiny_config):
    assert decode_mode(tiny_config(), cap=1000) == "episode"
    # An explicit budget is the user's word and is not capped.
    assert decode_mode(tiny_config("data.memory_budget_gb=1"), cap=1000) == "memory"


def test_bad_decode_settings_are_one_line_errors(tiny_config, synthetic_store):
    with pytest.raises(ConfigError, match=r"^data\.decode: .*'lazy'"):
        tiny_config("data.decode=lazy")
    with pytest.raises(ConfigError, match=r"^data\.memory_budget_gb: "):
        load_config(None, ["data.memory_budget_gb=0"])
    with pytest.raises(DataError, match="auto"):  # load_split needs a resolved mode
        load_split(synthetic_store, "train", 16, "auto")


@pytest.mark.parametrize("mode", ["memory", "episode"])
def test_shared_form_round_trips_without_copying(tiny_config, mode):
    data = Datasets.load(tiny_config(f"data.decode={mode}"))
    tree = data.shared()
    # What Ray's object store hands a worker: read-only arrays.
    for split in ("train", "val"):
        for value in tree[split]["pixels"].values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
    back = Datasets.from_shared(tree)

    def pixels(images: ImageSet) -> np.ndarray:
        return images.images.blobs if images.encoded else images.images.numpy()

    assert np.shares_memory(pixels(back.train), pixels(data.train))
    assert_same(episodes(data.train), episodes(back.train))


def test_encoded_images_are_the_stored_bytes_in_row_order(tmp_path, monkeypatch):
    """Spans over Arrow's buffers, across several Parquet parts, hit each row's bytes."""
    monkeypatch.setattr(store, "ROWS_PER_PART", 7)  # several parts, ragged last one
    synthetic.prepare(tmp_path / "s", groups=(1, 1, 1), classes_per_group=3, images_per_class=5)
    images = load_split(tmp_path / "s", "train", 20, "episode").images
    rows = [
        blob
        for part in sorted((tmp_path / "s" / "split=train").glob("*.parquet"))
        for blob in pq.read_table(part).column("image").to_pylist()
    ]
    assert len(images) == len(rows) == 15
    for i, blob in enumerate(rows):
        start, end = images.spans[i]
        assert images.blobs[start:end].tobytes() == blob
        np.testing.assert_array_equal(images.decode(i), decode_image(blob, 20, 1, True))


def test_an_undecodable_image_in_an_old_store_is_one_line(synthetic_store):
    """Stores prepared before every image was decoded at prepare time may hold one."""
    encoded = load_split(synthetic_store, "test", 16, "episode").images
    good = encoded.blobs[encoded.spans[0, 0] : encoded.spans[0, 1]].tobytes()
    bad = good[:60] + bytes(len(good) - 60)  # header kept, pixels zeroed
    blobs = np.frombuffer(good + bad, dtype=np.uint8)
    spans = np.array([[0, len(good)], [len(good), len(good) + len(bad)]])
    images = EncodedImages(blobs, spans, 16, encoded.channels, encoded.invert)
    assert images[torch.tensor([0])].shape == (1, encoded.channels, 16, 16)
    with pytest.raises(DataError, match=r"^image 1 of the loaded split cannot be decoded"):
        images[torch.tensor([0, 1])]
