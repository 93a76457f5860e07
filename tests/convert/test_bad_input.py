"""Bad checkpoints fail loudly, all at once, and unsafe pickles never run."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import blip_jax
from blip_jax.convert import hf, keymap, salesforce
from tiny_blip import build, to_salesforce


@pytest.fixture(scope="module")
def captioner():
    return build("BlipForConditionalGeneration", seed=21)


def test_missing_unexpected_and_misshaped_keys_are_reported_together(captioner):
    config, _, task = hf.import_hf(captioner)
    state = {k: v.numpy() for k, v in captioner.state_dict().items()}
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    del state["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"]
    state["text_decoder.bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((48, 7), np.float32)
    state["vision_model.encoder.layers.0.self_attn.qkv.weight"] = np.zeros((96, 33), np.float32)
    state["text_decoder.bert.pooler.dense.weight"] = np.zeros((24, 24), np.float32)
    state["vision_model.encoder.layers.2.layer_norm1.weight"] = np.zeros((32,), np.float32)  # a 3rd layer
    with pytest.raises(keymap.KeyMappingError) as caught:
        hf.import_state(state, config, task, "hf", "my_checkpoint_dir")
    message = str(caught.value)
    first_line = message.splitlines()[0]
    assert first_line.startswith("my_checkpoint_dir: 6 key problem(s) for task 'caption'")
    assert "2 missing, 2 unexpected, 2 wrong shape" in first_line
    for expected in [
        "missing: vision_model.encoder.layers.1.mlp.fc2.bias",
        "missing: text_decoder.bert.encoder.layer.0.crossattention.self.key.weight",
        "wrong shape: text_decoder.bert.encoder.layer.1.intermediate.dense.weight: got (48, 7), expected (48, 24)",
        "wrong shape: vision_model.encoder.layers.0.self_attn.qkv.weight: got (96, 33), expected (96, 32)",
        "unexpected: text_decoder.bert.pooler.dense.weight",
        "unexpected: vision_model.encoder.layers.2.layer_norm1.weight",
    ]:
        assert expected in message


def test_pretrain_copies_that_disagree_are_reported(captioner):
    """Pre-training lists shared tensors twice (§2.3); if the copies differ the checkpoint is not BLIP's."""
    retrieval = build("BlipForImageTextRetrieval", seed=22)
    state = to_salesforce(retrieval.state_dict())
    for key, value in to_salesforce(captioner.state_dict()).items():
        if key.startswith("text_decoder."):
            state[key] = value  # the decoder's "shared" tensors come from another model: they disagree
    with pytest.raises(keymap.KeyMappingError, match="shared copies disagree") as caught:
        salesforce.import_salesforce(state, overrides={"vision.num_heads": 2, "text.num_heads": 4})
    assert ("shared copies disagree: text_encoder.encoder.layer.0.output.dense.weight != "
            "text_decoder.bert.encoder.layer.0.output.dense.weight") in str(caught.value)


class _RunsCode:
    """Unpickling this calls os.system: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, captioner):
    # Control: the payload really runs code when unpickled without restrictions.
    control = tmp_path / "control_marker"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=pickle.dumps(_RunsCode(control)), check=True)
    assert control.exists()

    marker = tmp_path / "marker"
    state = to_salesforce(captioner.state_dict())
    zipped = tmp_path / "model_base_caption.pth"
    torch.save({"model": state, "hook": _RunsCode(marker)}, str(zipped))
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as handle:
        pickle.dump({"model": {}, "hook": _RunsCode(marker)}, handle, protocol=2)
    for path in (zipped, legacy):
        refused = r"refused to load .*\(GLOBAL posix\.system\); nothing from it was executed"
        with pytest.raises(salesforce.UnsafeCheckpointError, match=refused):
            blip_jax.load(str(path))
        assert not marker.exists()


def test_unknown_sources_and_tasks_give_one_line_errors(tmp_path, captioner):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        blip_jax.load(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown task 'captioning'"):
        blip_jax.load(captioner, task="captioning")
    with pytest.raises(ValueError, match="holds a BlipForConditionalGeneration"):
        blip_jax.load(captioner, task="retrieval")
    with pytest.raises(ValueError, match="URL"):
        blip_jax.load("https://example.com/model_base.pth")
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth is not a readable PyTorch checkpoint"):
        blip_jax.load(str(tmp_path / "garbage.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        blip_jax.load(str(tmp_path / "empty"))
