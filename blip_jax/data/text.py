"""Text side of BLIP's data: caption/question cleaning (blip.md §3.2) and the BERT tokenizer.

`tokenizer(name_or_path)` gives a transformers BertTokenizer (WordPiece, uncased) with BLIP's two
additions, exactly as BLIP's `init_tokenizer`: bos `[DEC]` (id = base vocab size) and `[ENC]`
(id = base vocab size + 1). Ids equal transformers' BertTokenizer plus those additions. The model,
not the tokenizer, puts [ENC]/[DEC] in position 0.
"""
from __future__ import annotations

import os
import re

import numpy as np

SYNTHETIC_SHAPES = "synthetic_shapes"
SYNTHETIC_SHAPES_VOCAB = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "assets", "synthetic_shapes", "vocab.txt"))

_CAPTION_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lowercase, punctuation to spaces, collapse whitespace, cap words."""
    caption = _CAPTION_PUNCTUATION.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning: lowercase, delete punctuation, right-strip spaces, cap words."""
    question = _CAPTION_PUNCTUATION.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def _resolve(name_or_path: str) -> tuple:
    """('dir'|'vocab'|'hub', path) for a tokenizer source, or a one-line ValueError."""
    if name_or_path == SYNTHETIC_SHAPES:
        return "vocab", SYNTHETIC_SHAPES_VOCAB
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")) or \
                os.path.exists(os.path.join(path, "tokenizer_config.json")):
            return "dir", path
        if os.path.exists(os.path.join(path, "vocab.txt")):
            return "vocab", os.path.join(path, "vocab.txt")
        raise ValueError(f"tokenizer directory {path} has no tokenizer.json or vocab.txt: "
                         "point to a BERT tokenizer directory or a vocab.txt file")
    if os.path.isfile(path):
        return "vocab", path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".txt"):
        raise ValueError(f"tokenizer path {name_or_path} does not exist: give a directory, a "
                         f"vocab.txt, '{SYNTHETIC_SHAPES}' or a hub name such as bert-base-uncased")
    return "hub", name_or_path


def tokenizer(name_or_path: str = "bert-base-uncased"):
    """A BERT WordPiece tokenizer plus BLIP's [DEC] (bos) and [ENC] tokens.

    name_or_path: 'synthetic_shapes' (the shipped vocab), a directory (tokenizer.json or vocab.txt),
    a vocab.txt file, or a hub name such as 'bert-base-uncased' (needs network or the HF cache).
    Attributes: bos_token_id == dec_token_id (= base vocab size), enc_token_id (= base + 1),
    pad/cls/sep_token_id, vocab_size_with_specials (what the model's word embedding needs).
    """
    from transformers import BertTokenizer
    kind, source = _resolve(name_or_path)
    try:
        if kind == "vocab":
            tok = BertTokenizer(vocab=source, do_lower_case=True)
        else:
            tok = BertTokenizer.from_pretrained(source)
    except OSError as error:
        raise ValueError(f"cannot load tokenizer {name_or_path!r} ({error.__class__.__name__}): "
                         "offline? pass a local directory or vocab.txt instead") from None
    base_size = len(tok)
    if base_size <= len(tok.all_special_tokens):  # transformers returns an empty vocab offline
        raise ValueError(f"tokenizer {name_or_path!r} has no vocabulary (offline, or not a BERT "
                         "tokenizer?): pass a local directory or vocab.txt instead")
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.dec_token_id = tok.convert_tokens_to_ids("[DEC]")
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    tok.vocab_size_with_specials = len(tok)
    if kind != "dir" and (tok.dec_token_id, tok.enc_token_id) != (base_size, base_size + 1):
        raise ValueError(f"tokenizer {name_or_path!r}: [DEC]/[ENC] got ids {tok.dec_token_id}/"
                         f"{tok.enc_token_id}, expected {base_size}/{base_size + 1}")
    return tok


def token_ids(tok) -> dict:
    """The special ids a model config needs: pad, cls, sep, dec, enc, vocab_size."""
    return {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id,
            "dec": tok.dec_token_id, "enc": tok.enc_token_id, "vocab_size": len(tok)}


def tokenize(tok, texts: list, max_length: int) -> dict:
    """Fixed-length ids and mask for a list of already-cleaned texts: {'input_ids', 'attention_mask'}
    as (len(texts), max_length) int32."""
    encoded = tok(list(texts), padding="max_length", truncation=True, max_length=max_length,
                  return_token_type_ids=False)
    return {key: np.asarray(encoded[key], np.int32) for key in ("input_ids", "attention_mask")}
