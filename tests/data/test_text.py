"""pre_caption / pre_question golden cases (blip.md §3.2) and tokenizer parity with transformers."""
import pytest
from transformers import BertTokenizerLegacy

from blip_jax.data import text
from blip_jax.data.builders import synthetic_shapes


@pytest.mark.parametrize("raw, max_words, expected", [
    ("A man riding a horse.", 30, "a man riding a horse"),
    ("  Two dogs!!  (playing) in the *snow*; ~fun~  ", 30, "two dogs playing in the snow fun"),
    ('He said: "hi"#tag', 30, "he said hi tag"),
    ("Commas, apostrophes' and hy-phens stay", 30, "commas, apostrophes' and hy-phens stay"),
    ("Tabs\tand\n\nnewlines   collapse\n", 30, "tabs\tand newlines collapse"),
    ("Café ÜBER naïve 東京.", 30, "café über naïve 東京"),
    (" ".join(f"w{i}" for i in range(40)), 30, " ".join(f"w{i}" for i in range(30))),
    ("one two three", 2, "one two"),
    ("...", 30, ""),
])
def test_pre_caption_golden(raw, max_words, expected):
    assert text.pre_caption(raw, max_words) == expected


@pytest.mark.parametrize("raw, expected", [
    ("What colour is the cat?", "what colour is the cat?"),
    ("Is it (really) a dog... ;", "is it really a dog"),
    ("How many:  people~ are there!  ", "how many  people are there"),
    ("Über-Café's \"sign\"", "über-café's sign"),
])
def test_pre_question_golden(raw, expected):
    assert text.pre_question(raw) == expected


def test_pre_question_caps_words():
    assert text.pre_question(" ".join(["word"] * 60)) == " ".join(["word"] * 50)


def _reference_tokenizer(vocab_path):
    """transformers' pure-Python BertTokenizer plus BLIP's init_tokenizer additions."""
    reference = BertTokenizerLegacy(vocab_file=vocab_path)
    reference.add_special_tokens({"bos_token": "[DEC]"})
    reference.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return reference


@pytest.fixture
def bert_like_vocab(tmp_path):
    words = ["the", "a", "man", "dog", "riding", "horse", "##s", "##ing", "play", "café", "snow",
             "'", ",", ".", "-", "!", "?", "东", "京", "new", "york", "##er"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
        words + chars + ["##" + c for c in chars]
    vocab = list(dict.fromkeys(vocab))  # unique, in order
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return str(path), len(vocab)


SENTENCES = ["A man riding horses.", "the dogs' play-ing in SNOW, café!", "new yorker 東京 ??",
             "", "zzz qqq unknownword", "a small red circle to the left of a big blue box"]


def test_tokenizer_ids_equal_transformers_plus_blip_additions(bert_like_vocab, tmp_path):
    vocab_path, base_size = bert_like_vocab
    ours, reference = text.tokenizer(vocab_path), _reference_tokenizer(vocab_path)
    assert (ours.bos_token_id, ours.dec_token_id, ours.enc_token_id) == (base_size, base_size, base_size + 1)
    assert reference.bos_token_id == base_size and reference.convert_tokens_to_ids("[ENC]") == base_size + 1
    for sentence in SENTENCES:
        expected = reference(sentence, padding="max_length", truncation=True, max_length=12)
        got = ours(sentence, padding="max_length", truncation=True, max_length=12)
        assert got["input_ids"] == expected["input_ids"], sentence
        assert got["attention_mask"] == expected["attention_mask"], sentence
    ids = ours("a man riding horses")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    # the same tokenizer loads back from a directory and from the directory holding vocab.txt
    ours.save_pretrained(tmp_path / "saved")
    reloaded = text.tokenizer(str(tmp_path / "saved"))
    assert reloaded("a man riding")["input_ids"] == ours("a man riding")["input_ids"]
    assert reloaded.enc_token_id == base_size + 1
    assert text.tokenizer(str(tmp_path))("a dog")["input_ids"] == ours("a dog")["input_ids"]


def test_tokenize_is_fixed_length_int32(bert_like_vocab):
    tok = text.tokenizer(bert_like_vocab[0])
    arrays = text.tokenize(tok, SENTENCES, max_length=7)
    assert arrays["input_ids"].shape == (len(SENTENCES), 7) and arrays["input_ids"].dtype.name == "int32"
    assert (arrays["input_ids"][:, 0] == tok.cls_token_id).all()
    assert (arrays["attention_mask"].sum(1) == [min(len(tok(s)["input_ids"]), 7) for s in SENTENCES]).all()


def test_synthetic_vocab_covers_every_caption_word_as_one_token():
    tok = text.tokenizer(text.SYNTHETIC_SHAPES)
    assert text.token_ids(tok)["dec"] == len(open(text.SYNTHETIC_SHAPES_VOCAB).read().split())
    captions = synthetic_shapes.caption_corpus(size_per_split=100)
    reference = _reference_tokenizer(text.SYNTHETIC_SHAPES_VOCAB)
    for caption in captions[:300]:
        cleaned = text.pre_caption(caption)
        ids = tok(cleaned, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, caption
        words = [w for w in cleaned.replace(",", " ,").split()]
        assert len(ids) == len(words), caption  # each word (and comma) is a single token
        assert ids == reference(cleaned, add_special_tokens=False)["input_ids"]


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        text.tokenizer(str(tmp_path / "nope" / "vocab.txt"))
    with pytest.raises(ValueError, match="no tokenizer.json or vocab.txt"):
        text.tokenizer(str(tmp_path))
    (tmp_path / "empty.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match="has no vocabulary"):
        text.tokenizer(str(tmp_path / "empty.txt"))
