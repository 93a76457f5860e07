"""Inference commands: `blip-jax caption | ask | match | classify` (wired in blip_jax/cli.py).

  blip-jax caption PATHS... --model SRC [--beams 3 --max-length 20 --min-length 5 | --sample --top-p 0.9]
                   [--prompt "a picture of "] [--batch-size 8] [--image-size N] [--output out.jsonl|out.csv]
  blip-jax ask IMAGE "question" --model SRC
  blip-jax match IMAGE "text" ["text" ...] --model SRC
  blip-jax classify IMAGE [IMAGE ...] --labels "a dog,a cat" --model SRC [--itm-rerank]

SRC is anything `blip_jax.load` accepts. The tokenizer is --tokenizer, else the SRC directory when it holds
vocab.txt / tokenizer.json, else bert-base-uncased. An unreadable image is reported on stderr with its
path and the reason; every other image is still processed, and the exit code is 1 if any image failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.caption_output import CaptionWriter

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_TOKENIZER = "bert-base-uncased"


# ----------------------------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------------------------
def _error(command: str, message: str) -> None:
    print(f"blip-jax {command}: {message}", file=sys.stderr, flush=True)


def find_images(paths, report) -> list[str]:
    """Image files named by `paths`: files as given, folders searched recursively for image extensions
    (sorted). A path that does not exist is passed to report(path, reason)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found.extend(os.path.join(root, name) for name in sorted(files)
                             if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.exists(path):
            found.append(path)
        else:
            report(path, "no such file or directory")
    unique, seen = [], set()
    for path in found:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def read_image(path: str, image_size: int) -> np.ndarray:
    """(S, S, 3) float32 pixels exactly as BlipImageProcessor makes them; raises with a readable reason."""
    from PIL import UnidentifiedImageError

    from blip_jax.preprocess import preprocess_image

    try:
        return preprocess_image(path, image_size)
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read (corrupt or unsupported format)") from None
    except Exception as error:  # noqa: BLE001 - any failure to decode one file is that file's problem
        raise ValueError(f"{error.__class__.__name__}: {error}") from None


def load_bundle(args, tasks: tuple[str, ...], command: str):
    """blip_jax.load(args.model) at --image-size, checked to be one of `tasks`."""
    import blip_jax

    bundle = blip_jax.load(args.model, image_size=getattr(args, "image_size", None))
    if bundle.task not in tasks:
        raise ValueError(f"--model {args.model} is a {bundle.task} model; `blip-jax {command}` needs a "
                         f"{' or '.join(tasks)} model")
    return bundle


def load_tokenizer(args):
    """--tokenizer, else the model directory if it holds a tokenizer, else bert-base-uncased."""
    from blip_jax.data.text import tokenizer

    if args.tokenizer:
        return tokenizer(args.tokenizer)
    source = os.path.expanduser(str(args.model))
    if os.path.isdir(source) and any(os.path.exists(os.path.join(source, name))
                                     for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json")):
        return tokenizer(source)
    return tokenizer(DEFAULT_TOKENIZER)


def load_bundle_and_tokenizer(args, tasks: tuple[str, ...], command: str):
    """(load_bundle(...), load_tokenizer(args)), checked to agree on the vocabulary and [DEC]."""
    bundle = load_bundle(args, tasks, command)
    tok = load_tokenizer(args)
    expected = int(bundle.config.text.vocab_size)
    if len(tok) != expected or tok.dec_token_id != int(bundle.config.tokens.dec):
        raise ValueError(f"the tokenizer has {len(tok)} tokens ([DEC] = {tok.dec_token_id}) but the model expects "
                         f"{expected} ([DEC] = {int(bundle.config.tokens.dec)}): pass the model's tokenizer "
                         "with --tokenizer")
    return bundle, tok


def _add_model_arguments(parser, image_size=True):
    parser.add_argument("--model", required=True,
                        help="blip-jax checkpoint dir, transformers BLIP dir, or Salesforce .pth")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer dir / vocab.txt / hub name (default: the model dir, else bert-base-uncased)")
    if image_size:
        parser.add_argument("--image-size", type=int, default=None,
                            help="input resolution (default: the model's; other sizes resample pos_embed)")


def _run_guarded(command, body, args) -> int:
    """Run a command body; a user error (bad path, wrong model) is one line on stderr and exit code 2."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        _error(command, str(error))
        return 2


# ----------------------------------------------------------------------------------------------------
# caption
# ----------------------------------------------------------------------------------------------------
def caption_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATHS", help="image files or folders (searched recursively)")
    _add_model_arguments(parser)
    parser.add_argument("--beams", type=int, default=3, help="beam search width (default 3, as BLIP)")
    parser.add_argument("--max-length", type=int, default=20, help="max tokens incl. [DEC] and the prompt (20)")
    parser.add_argument("--min-length", type=int, default=5, help="min tokens incl. [DEC] and the prompt (5)")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass with --sample (0.9)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="top-k with --sample (50: transformers' default, which BLIP sampled with; 0 = off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature with --sample")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="default: 1.1 with --sample (BLIP), 1.0 with beam search")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--prompt", default="", help='text the caption starts with, e.g. "a picture of " '
                        "(stripped from the output, as BLIP does)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    parser.add_argument("--output", default=None,
                        help="write .jsonl or .csv (resumable: images already in it are skipped); default stdout")


def _load_batch(paths, image_size):
    """[(path, pixels | None, reason | None)] for a batch, reading files on a worker thread."""
    results = []
    for path in paths:
        try:
            results.append((path, read_image(path, image_size), None))
        except ValueError as error:
            results.append((path, None, str(error)))
    return results


def _caption(args) -> int:
    from tqdm import tqdm

    from blip_jax import decode

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    failures: list[tuple[str, str]] = []

    def report(path, reason):
        failures.append((path, reason))
        _error("caption", f"cannot read {path}: {reason}")

    images = find_images(args.paths, report)
    writer = CaptionWriter(args.output) if args.output else None
    done = writer.done() if writer else set()
    todo = [path for path in images if os.path.abspath(path) not in done]
    skipped = len(images) - len(todo)
    if not todo:
        print(f"blip-jax caption: nothing to do: {len(images)} image(s) found, {skipped} already in "
              f"{args.output}" if writer else f"blip-jax caption: no images found in {' '.join(args.paths)}",
              file=sys.stderr)
        return 1 if failures or not images else 0

    bundle, tok = load_bundle_and_tokenizer(args, ("caption", "pretrain"), "caption")
    image_size = int(bundle.config.vision.image_size)
    prompt_ids = np.asarray(tok(args.prompt)["input_ids"], np.int32)[None] if args.prompt else None
    settings = dict(num_beams=1 if args.sample else args.beams, max_length=args.max_length,
                    min_length=args.min_length, do_sample=args.sample, repetition_penalty=args.repetition_penalty,
                    top_p=args.top_p if args.sample else 1.0, top_k=args.top_k if args.sample else 0,
                    temperature=args.temperature if args.sample else 1.0)
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]

    if writer:
        writer.open()
    captioned = 0
    start_time = time.perf_counter()
    progress = tqdm(total=len(todo), unit="img", desc="caption", file=sys.stderr, dynamic_ncols=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_load_batch, batches[0], image_size)
            for index in range(len(batches)):
                loaded = pending.result()
                if index + 1 < len(batches):  # read the next batch while this one decodes
                    pending = pool.submit(_load_batch, batches[index + 1], image_size)
                good = [(path, pixels) for path, pixels, reason in loaded if reason is None]
                for path, _, reason in loaded:
                    if reason is not None:
                        progress.clear()
                        report(path, reason)
                if good:
                    pixels = np.stack([pixels for _, pixels in good])
                    # Pad a short batch to the batch size: one compiled program serves every batch.
                    pad = args.batch_size - len(good)
                    if pad:
                        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
                    # A fresh draw per batch, reproducible.
                    ids = bundle.generate(pixels, prompt_ids, seed=args.seed + index, **settings)[: len(good)]
                    captions = decode.ids_to_text(tok, ids, args.prompt or None)
                    for (path, _), caption in zip(good, captions):
                        if writer:
                            writer.write(path, caption)
                        else:
                            progress.clear()
                            print(f"{path}\t{caption}", flush=True)
                    if writer:
                        writer.flush()
                    captioned += len(good)
                progress.update(len(loaded))
    finally:
        progress.close()
        if writer:
            writer.close()
    elapsed = time.perf_counter() - start_time
    summary = (f"blip-jax caption: {captioned} captioned, {skipped} already done, {len(failures)} failed "
               f"in {elapsed:.1f} s ({captioned / max(elapsed, 1e-9):.2f} img/s)")
    if writer:
        summary += f" -> {args.output}"
    print(summary, file=sys.stderr)
    for path, reason in failures:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def caption_run(args) -> int:
    return _run_guarded("caption", _caption, args)


# ----------------------------------------------------------------------------------------------------
# ask
# ----------------------------------------------------------------------------------------------------
def ask_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("question", metavar="QUESTION", help="the question, e.g. \"what is the dog doing?\"")
    _add_model_arguments(parser)
    parser.add_argument("--beams", type=int, default=3, help="beam search width (3, as BLIP_VQA)")
    parser.add_argument("--max-length", type=int, default=10, help="max answer tokens incl. [DEC] (10)")
    parser.add_argument("--min-length", type=int, default=1, help="min answer tokens incl. [DEC] (1)")


def _single_image_inputs(args, tasks, command):
    """(bundle, tokenizer, pixels (1, S, S, 3)) for a one-image command; pixels is None (reported) if unreadable."""
    bundle, tok = load_bundle_and_tokenizer(args, tasks, command)
    try:
        return bundle, tok, read_image(args.image, int(bundle.config.vision.image_size))[None]
    except ValueError as error:
        _error(command, f"cannot read {args.image}: {error}")
        return bundle, tok, None


def _ask(args) -> int:
    bundle, tok, pixels = _single_image_inputs(args, ("vqa",), "ask")
    if pixels is None:
        return 1
    answers = bundle.answer_text(pixels, [args.question], tokenizer=tok, num_beams=args.beams,
                                 max_length=args.max_length, min_length=args.min_length)
    print(answers[0])
    return 0


def ask_run(args) -> int:
    return _run_guarded("ask", _ask, args)


# ----------------------------------------------------------------------------------------------------
# match and classify (ITC cosine, ITM probability)
# ----------------------------------------------------------------------------------------------------
def _encode_texts(tok, texts, max_length=35):
    from blip_jax.data.text import pre_caption

    encoded = tok([pre_caption(text, 30) for text in texts], padding="longest", truncation=True,
                  max_length=max_length)
    return np.asarray(encoded["input_ids"], np.int32), np.asarray(encoded["attention_mask"], np.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _text_program(model, params, input_ids, attention_mask):
    return model.apply({"params": params}, input_ids, attention_mask, method="text_features")


@functools.partial(jax.jit, static_argnames=("model",))
def _itc_program(model, params, pixels, text_feat):
    def forward(module, pixels, text_feat):
        image_embeds = module.image_embeds(pixels)  # (1, S, D)
        cosine = jnp.einsum("ie,te->t", module.image_features(image_embeds), text_feat,
                            precision=jax.lax.Precision.HIGHEST)
        return image_embeds, cosine, module.temperature()

    return model.apply({"params": params}, pixels, text_feat, method=forward)


@functools.partial(jax.jit, static_argnames=("model", "enc_token_id"))
def _itm_program(model, enc_token_id, params, image_embeds, input_ids, attention_mask):
    def forward(module, image_embeds, input_ids, attention_mask):
        image_embeds = jnp.broadcast_to(image_embeds, (input_ids.shape[0],) + image_embeds.shape[1:])
        logits = module.itm_logits(input_ids.at[:, 0].set(enc_token_id), attention_mask, image_embeds)
        return jax.nn.softmax(logits, axis=-1)[:, 1]

    return model.apply({"params": params}, image_embeds, input_ids, attention_mask, method=forward)


def text_features(bundle, input_ids, attention_mask):
    """Projected text features (T, E) of T texts (int32 ids, [CLS] first, as _encode_texts gives them)."""
    return _text_program(bundle.model, bundle.params, input_ids, attention_mask)


def image_text_scores(bundle, pixels, text_feat):
    """One image (1, S, S, 3) float32 against T text features -> (image tokens (1, S, D), ITC cosine (T,),
    ITC probability over the T texts = softmax(cosine / temp) (T,))."""
    image_embeds, cosine, temperature = _itc_program(bundle.model, bundle.params, pixels, text_feat)
    cosine = np.asarray(cosine)
    logits = cosine / float(temperature)
    itc_probability = np.exp(logits - logits.max())
    itc_probability /= itc_probability.sum()
    return image_embeds, cosine, itc_probability


def itm_probability(bundle, image_embeds, input_ids, attention_mask) -> np.ndarray:
    """ITM match probability (T,) of one image's tokens (image_text_scores) with T texts ([ENC] goes first)."""
    return np.asarray(_itm_program(bundle.model, int(bundle.config.tokens.enc), bundle.params, image_embeds,
                                   input_ids, attention_mask))


def match_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="one or more texts to score against the image")
    _add_model_arguments(parser)


def _match(args) -> int:
    bundle, tok, pixels = _single_image_inputs(args, ("retrieval", "pretrain"), "match")
    if pixels is None:
        return 1
    input_ids, attention_mask = _encode_texts(tok, args.texts)
    image_embeds, cosine, _ = image_text_scores(bundle, pixels, text_features(bundle, input_ids, attention_mask))
    match = itm_probability(bundle, image_embeds, input_ids, attention_mask)
    print("itm_prob\titc_cosine\ttext")
    for text, probability, similarity in zip(args.texts, match, cosine):
        print(f"{probability:.4f}\t{similarity:.4f}\t{text}")
    return 0


def match_run(args) -> int:
    return _run_guarded("match", _match, args)


def classify_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--labels", required=True, help='comma-separated class names, e.g. "a dog,a cat,a car"')
    parser.add_argument("--template", default="{}",
                        help='text for each label, e.g. "a picture of {}" (default: the label itself)')
    parser.add_argument("--itm-rerank", action="store_true",
                        help="re-rank the --top-k ITC candidates by ITM match probability")
    parser.add_argument("--top-k", type=int, default=5, help="labels to print (and to re-rank with --itm-rerank)")
    _add_model_arguments(parser)


def _classify(args) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels {args.labels!r} names fewer than two classes: give a comma-separated list")
    if "{}" not in args.template:
        raise ValueError(f"--template {args.template!r} has no {{}} where the label goes")
    bundle, tok = load_bundle_and_tokenizer(args, ("retrieval", "pretrain"), "classify")
    input_ids, attention_mask = _encode_texts(tok, [args.template.format(label) for label in labels])
    text_feat = text_features(bundle, input_ids, attention_mask)  # once for every image
    image_size = int(bundle.config.vision.image_size)
    top_k = max(1, min(args.top_k, len(labels)))
    failed = 0
    for path in args.images:
        try:
            pixels = read_image(path, image_size)[None]
        except ValueError as error:
            _error("classify", f"cannot read {path}: {error}")
            failed += 1
            continue
        image_embeds, cosine, probability = image_text_scores(bundle, pixels, text_feat)
        order = np.argsort(-probability, kind="stable")[:top_k]
        print(path)
        if args.itm_rerank:
            # ITC picks the top-k candidates, ITM orders them (the retrieval recipe, blip.md §2.4).
            match = itm_probability(bundle, image_embeds, input_ids[order], attention_mask[order])
            print("  rank\titm_prob\titc_prob\titc_cosine\tlabel")
            for rank, position in enumerate(np.argsort(-match, kind="stable"), 1):
                label = order[position]
                print(f"  {rank}\t{match[position]:.4f}\t{probability[label]:.4f}\t{cosine[label]:.4f}\t"
                      f"{labels[label]}")
        else:
            print("  rank\titc_prob\titc_cosine\tlabel")
            for rank, label in enumerate(order, 1):
                print(f"  {rank}\t{probability[label]:.4f}\t{cosine[label]:.4f}\t{labels[label]}")
    if failed:
        print(f"blip-jax classify: {len(args.images) - failed} classified, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def classify_run(args) -> int:
    return _run_guarded("classify", _classify, args)
