import numpy as np

from fewshot.data.reader import load_split
from fewshot.data.sources import synthetic
from fewshot.data.store import read_manifest


def test_same_seed_same_bytes_and_disjoint_scripts(tmp_path):
    a = synthetic.generate((2, 1, 1), classes_per_group=3, images_per_class=4, seed=5)
    b = synthetic.generate((2, 1, 1), classes_per_group=3, images_per_class=4, seed=5)
    assert [e.image for e in a["train"]] == [e.image for e in b["train"]]
    groups = {split: {e.group for e in examples} for split, examples in a.items()}
    assert not (groups["train"] & groups["test"] or groups["train"] & groups["val"])
    assert {len(v) for v in groups.values()} == {1, 2}


def test_drawings_of_a_character_are_closer_than_drawings_of_different_ones(synthetic_store):
    """The set poses a real few-shot problem: instances vary, classes differ more."""
    images = load_split(synthetic_store, "train", 28)
    x = images.images.float().flatten(1)
    x = x / x.norm(dim=1, keepdim=True)
    same, other = [], []
    for label in range(images.n_classes):
        idx = images.by_class[label]
        mine = x[idx]
        same.append((mine[:1] @ mine[1:].T).mean().item())
        other_idx = images.by_class[(label + 1) % images.n_classes]
        other.append((mine[:1] @ x[other_idx].T).mean().item())
    assert np.mean(same) > np.mean(other) + 0.1
    # ...but no drawing repeats another exactly.
    assert len({tuple(row.tolist()) for row in images.images.flatten(1)}) == len(images.images)
    assert read_manifest(synthetic_store)["splits"]["train"]["classes"] == 36


def test_rgb_option_makes_colour_stores_and_keeps_the_grey_recipe(tmp_path, synthetic_store):
    manifest = synthetic.prepare(
        tmp_path / "rgb",
        groups=(1, 1, 1),
        classes_per_group=5,
        images_per_class=2,
        canvas=84,
        rgb=True,
    )
    assert manifest["channels"] == 3 and manifest["image_shape"] == [84, 84]
    assert not manifest["invert"]
    images = load_split(tmp_path / "rgb", "train", 84)
    assert images.images.shape == (10, 3, 84, 84)
    assert (images.images[:, 0] != images.images[:, 1]).any()  # coloured, not grey
    # Grey stores made before the option keep their checksum (so they are not rebuilt).
    assert read_manifest(synthetic_store)["recipe"] == "v1-(6, 2, 2)-6-10-0"
