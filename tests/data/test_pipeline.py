"""Input pipeline: exact resume, per-process coverage, eval padding, global arrays, coco adapter."""
import io

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from blip_jax.data import host, pipeline, text
from blip_jax.data.builders import synthetic_shapes


def _equal_batches(a, b):
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_restart_at_step_k_gives_the_uninterrupted_batches(shapes_config):
    shapes_config.update(split="test", batch_size=64, image_size=32, min_scale=0.3, flip=True, randaug=True)
    # 300 examples, 64 per step: step 4 (items 256-319) straddles the first epoch boundary
    uninterrupted = host.host_train_batches(shapes_config, process_index=0, process_count=1)
    run = [next(uninterrupted) for _ in range(7)]
    for k in (1, 4, 6):
        restarted = next(host.host_train_batches(shapes_config, start_step=k, process_index=0, process_count=1))
        assert _equal_batches(restarted, run[k]), k
    assert not _equal_batches(run[5], run[6])
    # the second epoch reuses examples but with fresh augmentation: same image id, different pixels
    ids_epoch0 = {int(i): n for n, i in enumerate(np.concatenate([b["image_id"] for b in run[:4]]))}
    images_epoch0 = np.concatenate([b["image"] for b in run[:4]])
    repeats = [(ids_epoch0[int(i)], img) for i, img in zip(run[6]["image_id"], run[6]["image"]) if int(i) in ids_epoch0]
    assert repeats and sum(not np.array_equal(images_epoch0[n], img) for n, img in repeats) > 0.9 * len(repeats)


def test_other_seed_gives_other_batches(shapes_config):
    first = next(host.host_train_batches(shapes_config, process_index=0, process_count=1))
    shapes_config.seed = 1
    second = next(host.host_train_batches(shapes_config, process_index=0, process_count=1))
    assert not np.array_equal(first["image_id"], second["image_id"])


def test_resume_does_not_decode_skipped_images(shapes_config, monkeypatch):
    decoded = []
    original = host.transforms.train_transform_uint8

    def counting_transform(encoded, *args, **kwargs):
        count = tf.py_function(lambda: decoded.append(1) or 0, [], tf.int32)
        with tf.control_dependencies([count]):
            return tf.identity(original(encoded, *args, **kwargs))

    monkeypatch.setattr(host.transforms, "train_transform_uint8", counting_transform)
    shapes_config.num_parallel_calls = 1
    batches = host.train_dataset(shapes_config, start_step=300, process_index=0, process_count=1)
    next(iter(batches))  # 300 steps x 16 = 4800 examples skipped
    assert 16 <= len(decoded) < 200


def test_simulated_processes_see_every_example_once_per_epoch(shapes_config):
    shapes_config.split = "test"  # 300 examples
    count = 3
    per_process = []
    for index in range(count):
        stream, local_size = host.example_stream(shapes_config, 0, index, count)
        ids = [int(x) for x in stream.map(lambda ex: ex["image_id"]).take(2 * local_size).as_numpy_iterator()]
        epoch0, epoch1 = ids[:local_size], ids[local_size:]
        assert len(set(epoch0)) == local_size and set(epoch0) == set(epoch1) and epoch0 != epoch1
        per_process.append(epoch0)
    everything = sorted(i for ids in per_process for i in ids)
    first_id = synthetic_shapes.SPLIT_SIZES["train"] + synthetic_shapes.SPLIT_SIZES["val"]
    assert everything == list(range(first_id, first_id + 300))


def test_eval_batches_are_padded_to_the_same_count_on_every_process(shapes_config):
    shapes_config.update(eval_split="val", eval_batch_size=48)  # 200 examples, 3 processes x 16
    per_process = [list(host.host_eval_batches(shapes_config, None, i, 3)) for i in range(3)]
    assert len({len(batches) for batches in per_process}) == 1
    valid = np.concatenate([b["index"][b["mask"]] for batches in per_process for b in batches])
    assert sorted(valid.tolist()) == list(range(200))
    padded = np.concatenate([b["index"][~b["mask"]] for batches in per_process for b in batches])
    assert len(padded) > 0 and (padded == -1).all()
    texts = pipeline.eval_texts(shapes_config)
    assert len(texts["texts"]) == 200 * synthetic_shapes.CAPTIONS_PER_IMAGE
    for row in (0, 57, 199):
        assert all(texts["text_image_index"][t] == row for t in texts["image_text_indices"][row])


def test_global_batches_on_an_8_device_mesh(shapes_config):
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    batch = next(pipeline.train_iterator(shapes_config, mesh))
    expected = {"image": ((16, 64, 64, 3), np.float32), "input_ids": ((16, 30), np.int32),
                "attention_mask": ((16, 30), np.int32), "image_id": ((16,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    for value in batch.values():
        assert value.sharding.spec[0] == "data" and len(value.sharding.device_set) == 8
    image = np.asarray(batch["image"])
    assert -1.9 < image.min() < -1.0 and 1.5 < image.max() < 2.2  # CLIP-normalised [0, 255]
    tok = text.tokenizer("synthetic_shapes")
    ids = np.asarray(batch["input_ids"])
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert (np.asarray(batch["attention_mask"]) == (ids != tok.pad_token_id)).all()
    captions = {int(ex["image_id"]): [text.pre_caption(c.decode()) for c in ex["captions"]]
                for ex in tfds.as_numpy(synthetic_shapes.ensure_built(shapes_config.data_dir).as_dataset(split="train"))}
    for row, image_id in enumerate(np.asarray(batch["image_id"])):
        assert tok.decode(ids[row], skip_special_tokens=True) in captions[int(image_id)]
    evaluation = next(pipeline.eval_batches(shapes_config, mesh))
    assert evaluation["image"].shape == (32, 64, 64, 3) and evaluation["mask"].dtype == np.bool_
    texts = pipeline.eval_texts(shapes_config)
    text_batch = next(pipeline.text_batches(shapes_config, mesh, texts["texts"]))
    assert text_batch["input_ids"].shape == (32, 30) and np.asarray(text_batch["index"])[-1] == 31


def test_batch_not_divisible_by_devices_is_a_clear_error(shapes_config):
    shapes_config.batch_size = 12
    with pytest.raises(ValueError, match="not divisible by the 8 local devices"):
        next(pipeline.train_iterator(shapes_config, jax.make_mesh((8,), ("data",))))


def _coco_like_examples(count):
    """Records laid out as tfds coco_captions delivers them with SkipDecoding on the image."""
    rng = np.random.default_rng(0)
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(buffer, format="JPEG")
        yield {"image": buffer.getvalue(), "image/id": 1000 + index,
               "image/filename": f"COCO_{index}.jpg", "tfds_id": f"coco_captions-train__{index}",
               "captions": {"id": [index * 10, index * 10 + 1],
                            "text": [f"Photo number {index}.", f"ANOTHER view {index}"]}}


def test_coco_captions_adapter_with_mock_data(tmp_path):
    requested = []

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        requested.append(str(split))
        examples = list(_coco_like_examples(8))
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
            "image": tf.TensorSpec([], tf.string), "image/id": tf.TensorSpec([], tf.int64),
            "image/filename": tf.TensorSpec([], tf.string), "tfds_id": tf.TensorSpec([], tf.string),
            "captions": {"id": tf.TensorSpec([None], tf.int64), "text": tf.TensorSpec([None], tf.string)}})

    config = pipeline.default_input_config("coco_captions")
    config.update(data_dir=str(tmp_path), batch_size=4, image_size=32, tokenizer="synthetic_shapes",
                  eval_split="test", eval_batch_size=8)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        train = host.host_train_batches(config, process_index=0, process_count=1)
        batches = [next(train) for _ in range(3)]  # 8 examples, 4 per step: crosses an epoch
        texts = pipeline.eval_texts(config)
    assert "train+restval" in requested  # BLIP's Karpathy train = train + restval
    assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["image"].dtype == np.uint8
    assert set(np.concatenate([b["image_id"] for b in batches])) <= set(range(1000, 1008))
    assert texts["texts"][:2] == ["photo number 0", "another view 0"] and texts["image_ids"][0] == 1000
