"""Parity with transformers' PyTorch BLIP (≤1e-5, float32) for every HF class, through blip_jax.load.

The bundle gets ids as the BERT tokenizer gives them ([CLS] first) and must put [ENC]/[DEC] in position 0
itself; transformers' forward does not, so HF is fed ids that already start with [ENC]/[DEC].
"""
import jax
import numpy as np
import pytest
import torch

import blip_jax
from tiny_blip import DEC, ENC, build, max_diff, nchw, padded_ids, pixels

TOL = 1e-5


@pytest.fixture(scope="module")
def captioner():
    return build("BlipForConditionalGeneration", seed=1)


@pytest.fixture(scope="module")
def retriever():
    return build("BlipForImageTextRetrieval", seed=2)


@pytest.fixture(scope="module")
def vqa():
    # transformers' VQA decoder cross-attention is sized to the vision width but reads question states,
    # so it only works with equal widths.
    return build("BlipForQuestionAnswering", seed=3, vision_width=32, text_width=32)


@pytest.fixture(scope="module")
def models(captioner, retriever, vqa):
    return {"caption": captioner, "retrieval": retriever, "vqa": vqa}


def test_caption_vision_tokens_and_lm_logits_padded(captioner, rng):
    bundle = blip_jax.load(captioner)
    assert bundle.task == "caption"
    assert bundle.config.vision.layer_norm_eps == 1e-5  # taken from the HF config, not the 1e-6 default
    images = pixels(rng, 3)
    ids, mask = padded_ids(rng, [7, 4, 9])  # different lengths, right padding
    hf_ids = ids.copy()
    hf_ids[:, 0] = DEC
    with torch.no_grad():
        out = captioner(pixel_values=nchw(images), input_ids=torch.tensor(hf_ids),
                        attention_mask=torch.tensor(mask))
    embeds = bundle.image_embeds(images)
    assert embeds.shape == (3, 1 + 16, 32)
    assert max_diff(embeds, out.image_embeds) <= TOL
    logits = bundle.lm_logits(images, ids, mask)
    assert logits.shape == (3, 9, 100)
    real = mask.astype(bool)
    assert max_diff(np.asarray(logits)[real], out.logits.numpy()[real]) <= TOL


def test_retrieval_itc_similarity_and_itm_logits_padded(retriever, rng):
    bundle = blip_jax.load(retriever)
    assert bundle.task == "retrieval"
    images = pixels(rng, 2)
    ids, mask = padded_ids(rng, [5, 8, 3])
    with torch.no_grad():
        itc = retriever(input_ids=torch.tensor(ids), pixel_values=nchw(images), attention_mask=torch.tensor(mask),
                        use_itm_head=False).itm_score
    similarity = bundle.itc_similarity(images, ids, mask)
    assert similarity.shape == (2, 3)
    assert max_diff(similarity, itc) <= TOL

    pair_images = pixels(rng, 3)
    hf_ids = ids.copy()
    hf_ids[:, 0] = ENC  # HF does not put [ENC] in position 0 itself
    with torch.no_grad():
        out = retriever(input_ids=torch.tensor(hf_ids), pixel_values=nchw(pair_images),
                        attention_mask=torch.tensor(mask), use_itm_head=True)
    itm = bundle.itm_logits(pair_images, ids, mask)
    assert itm.shape == (3, 2)
    assert max_diff(itm, out.itm_score) <= TOL
    assert max_diff(bundle.image_embeds(pair_images), out.last_hidden_state) <= TOL


def test_vqa_answer_decoder_logits_padded(vqa, rng):
    """The answer decoder cross-attends to the question states with the question padding masked, as the
    original BLIP_VQA does (encoder_attention_mask=question_atts). transformers 5.x drops that mask
    (BlipTextAttention passes it as `attention_mask`, which BlipTextSelfAttention ignores for
    cross-attention), so HF is run per question, unpadded, where the mask cannot matter."""
    bundle = blip_jax.load(vqa)
    assert bundle.task == "vqa"
    images = pixels(rng, 2)
    question, question_mask = padded_ids(rng, [6, 4])
    answer, answer_mask = padded_ids(rng, [3, 5])
    logits = np.asarray(bundle.answer_logits(images, question, question_mask, answer, answer_mask))
    for row in range(2):
        length = int(question_mask[row].sum())
        hf_question = question[row:row + 1, :length].copy()
        hf_question[:, 0] = ENC
        hf_answer = answer[row:row + 1].copy()
        hf_answer[:, 0] = DEC
        captured = {}
        hook = vqa.text_decoder.register_forward_hook(
            lambda module, args, output: captured.update(logits=output.logits))
        try:
            with torch.no_grad():
                vqa(input_ids=torch.tensor(hf_question), pixel_values=nchw(images[row:row + 1]),
                    attention_mask=torch.ones_like(torch.tensor(hf_question)),
                    decoder_input_ids=torch.tensor(hf_answer),
                    decoder_attention_mask=torch.tensor(answer_mask[row:row + 1]))
        finally:
            hook.remove()
        real = answer_mask[row].astype(bool)
        assert max_diff(logits[row][real], captured["logits"].numpy()[0][real]) <= TOL
    with pytest.raises(ValueError, match="answer_logits"):
        bundle.lm_logits(images, answer, answer_mask)


def test_second_image_size_resamples_pos_embed_like_interpolate_pos_encoding(captioner, rng):
    """load(image_size=48) resamples pos_embed once; tokens match HF's per-call interpolation."""
    bundle = blip_jax.load(captioner, image_size=48)  # 4x4 -> 6x6 patch grid
    assert bundle.params["visual_encoder"]["pos_embed"].shape == (1, 1 + 36, 32)
    images = pixels(rng, 2, size=48)
    ids, mask = padded_ids(rng, [6, 4])
    hf_ids = ids.copy()
    hf_ids[:, 0] = DEC
    with torch.no_grad():
        out = captioner(pixel_values=nchw(images), input_ids=torch.tensor(hf_ids), attention_mask=torch.tensor(mask),
                        interpolate_pos_encoding=True)
    assert max_diff(bundle.image_embeds(images), out.image_embeds) <= TOL


def _hf_outputs(model, task, rng):
    """Deterministic outputs of a transformers BLIP model on fixed random inputs."""
    images = nchw(pixels(rng, 2))
    ids, mask = padded_ids(rng, [6, 4])
    ids[:, 0] = {"caption": DEC, "retrieval": ENC, "vqa": ENC}[task]
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        if task == "caption":
            return model(pixel_values=images, input_ids=ids, attention_mask=mask).logits.numpy()
        if task == "retrieval":
            return np.concatenate([
                model(input_ids=ids, pixel_values=images, attention_mask=mask).itm_score.numpy().ravel(),
                model(input_ids=ids, pixel_values=images, attention_mask=mask,
                      use_itm_head=False).itm_score.numpy().ravel()])
        answer = ids.clone()
        answer[:, 0] = DEC
        captured = {}
        hook = model.text_decoder.register_forward_hook(lambda m, a, output: captured.update(out=output.logits))
        try:
            model(input_ids=ids, pixel_values=images, attention_mask=mask, decoder_input_ids=answer,
                  decoder_attention_mask=mask)
        finally:
            hook.remove()
        return captured["out"].numpy()


@pytest.mark.parametrize("task", ["caption", "retrieval", "vqa"])
def test_round_trip_import_export_hf_from_pretrained(models, task, tmp_path):
    """import -> export_hf -> Blip*.from_pretrained gives the same outputs; the export reloads bit-exactly."""
    original = models[task]
    bundle = blip_jax.load(original)
    out_dir = tmp_path / "hf"
    bundle.export_hf(str(out_dir))
    cls = type(original)
    reloaded = cls.from_pretrained(str(out_dir)).eval()
    assert type(reloaded) is cls
    assert max_diff(_hf_outputs(reloaded, task, np.random.default_rng(7)),
                    _hf_outputs(original, task, np.random.default_rng(7))) <= TOL
    again = blip_jax.load(str(out_dir))
    assert again.task == task and again.config.to_dict() == bundle.config.to_dict()
    assert jax.tree.all(jax.tree.map(np.array_equal, again.params, bundle.params))


def test_hf_directory_safetensors_and_pytorch_bin_import_like_in_memory(retriever, tmp_path):
    """A save_pretrained directory (model.safetensors) and a pytorch_model.bin directory import the same
    parameters as the in-memory model."""
    in_memory = blip_jax.load(retriever)
    safetensors_dir = tmp_path / "safetensors"
    retriever.save_pretrained(str(safetensors_dir))
    from_dir = blip_jax.load(str(safetensors_dir))
    assert from_dir.task == "retrieval"
    assert jax.tree.all(jax.tree.map(np.array_equal, from_dir.params, in_memory.params))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((safetensors_dir / "config.json").read_text())
    torch.save(retriever.state_dict(), str(bin_dir / "pytorch_model.bin"))
    from_bin = blip_jax.load(str(bin_dir))
    assert jax.tree.all(jax.tree.map(np.array_equal, from_bin.params, in_memory.params))
