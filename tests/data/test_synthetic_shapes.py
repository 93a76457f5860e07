"""synthetic_shapes: deterministic, held-out splits share no image, captions name every attribute."""
import random

import numpy as np
import tensorflow_datasets as tfds

from blip_jax.data.builders import synthetic_shapes as S


def test_generator_is_deterministic_for_a_seed():
    first = list(S.generate_split("val", size=20))
    again = list(S.generate_split("val", size=20))
    other = list(S.generate_split("val", size=20, seed_offset=1))
    for (_, a), (_, b) in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["captions"] == b["captions"] and a["image_id"] == b["image_id"]
    assert any(not np.array_equal(a["image"], c["image"]) for (_, a), (_, c) in zip(first, other))


def test_captions_name_every_attribute_of_every_object():
    rng = random.Random(0)
    for _ in range(200):
        scene = S.sample_scene(rng)
        for caption in S.scene_captions(rng, scene):
            for obj in scene["objects"]:
                assert obj["colour"] in caption
                assert any(word in caption for word in S.SHAPE_SYNONYMS[obj["shape"]])
                assert any(word in caption for word in S.SIZE_SYNONYMS[obj["size"]])
            if len(scene["objects"]) == 2:  # the relation is stated and matches the layout
                relation = ("left of", "right of") if scene["layout"] == "horizontal" else ("above", "over", "below")
                assert any(word in caption for word in relation)


def test_rendered_layout_matches_the_scene():
    rng, noise_rng = random.Random(3), np.random.default_rng(3)
    for _ in range(30):
        scene = S.sample_scene(rng)
        pixels = S.render_scene(rng, noise_rng, scene).astype(int)
        for obj in scene["objects"]:
            cy, cx = int((obj["row"] + 0.5) * S.CELL), int((obj["col"] + 0.5) * S.CELL)
            centre = pixels[cy, cx]
            assert np.abs(centre - np.array(S.COLOURS[obj["colour"]])).max() <= 20, (obj, centre)


def test_built_splits_have_the_documented_sizes_and_share_no_image(shapes_data_dir):
    builder = S.ensure_built(shapes_data_dir)
    digests, ids = {}, {}
    for split, size in S.SPLIT_SIZES.items():
        assert builder.info.splits[split].num_examples == size
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        digests[split] = {S.image_digest(ex["image"]) for ex in examples}
        ids[split] = {int(ex["image_id"]) for ex in examples}
        assert len(digests[split]) == len(ids[split]) == size
        assert all(len(ex["captions"]) == S.CAPTIONS_PER_IMAGE for ex in examples[:50])
    splits = list(S.SPLIT_SIZES)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not digests[a] & digests[b] and not ids[a] & ids[b], (a, b)
