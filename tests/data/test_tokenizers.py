"""Tokenizers: padding, truncation with a warning, the built-in shapes vocabulary, determinism."""
import json
import logging

import numpy as np
import pytest

from latent_diffusion.data.tokenizers import ShapesTokenizer, make_tokenizer

LOGGER = "latent_diffusion.data.tokenizers"


@pytest.fixture
def clip_dir(tmp_path):
    """A tiny CLIP BPE vocabulary written to disk, loaded the way a real one is."""
    pieces = ["a</w>", "red</w>", "circle</w>", "big</w>", "re", "c", "i", "r", "l", "e", "a", "d", "b", "g",
              "d</w>", "e</w>", "g</w>"]
    vocab = {"!": 0, **{p: i + 1 for i, p in enumerate(pieces)}}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    return tmp_path


@pytest.fixture
def bert_dir(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "big", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return tmp_path


def test_clip_tokenizer_pads_and_truncates(clip_dir, caplog):
    tok = make_tokenizer(f"clip:{clip_dir}", max_length=8)
    bos, eos = tok.bos_id, tok.eos_id
    assert tok.vocab_size == 20 and tok.pad_id == eos  # transformers' CLIPTokenizer pads with <|endoftext|>
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = tok(["a red", "red " * 10])
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    assert ids[0].tolist()[:3] == [bos, 1, 2] and ids[0, 3] == eos and (ids[0, 3:] == tok.pad_id).all()
    assert ids[1, 1:-1].tolist() == [2] * 6
    assert ids[1, 0] == bos and ids[1, -1] == eos  # truncation keeps the end token
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 of 2 prompt(s)" in warnings[0].getMessage()
    assert tok.empty.tolist() == [bos, eos] + [tok.pad_id] * 6


def test_no_warning_at_exact_fit(clip_dir, caplog):
    tok = make_tokenizer(f"clip:{clip_dir}", max_length=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = tok(["a red"])  # BOS + 2 + EOS
    assert not caplog.records and ids[0, -1] == tok.eos_id


def test_bert_tokenizer(bert_dir, caplog):
    tok = make_tokenizer(f"bert:{bert_dir}", max_length=6)
    assert tok.pad_id == 0 and tok.vocab_size == 10
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = tok(["A red circles", "a big red circle big a"])
    assert ids[0].tolist() == [2, 5, 6, 7, 9, 3]
    assert ids[1].tolist() == [2, 5, 8, 6, 7, 3] and len(caplog.records) == 1
    assert tok.empty.tolist() == [2, 3, 0, 0, 0, 0]


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        make_tokenizer("sentencepiece:foo")
    with pytest.raises(ValueError, match="could not load the clip tokenizer"):
        make_tokenizer("clip:/nonexistent/dir/for/sure")
    with pytest.raises(TypeError, match="list of prompts"):
        make_tokenizer("builtin:shapes")("a red circle")


def _shapes_captions(n=300):
    shapes = pytest.importorskip("latent_diffusion.data.shapes")
    rng = np.random.default_rng(0)
    return [shapes.caption_of(shapes.sample_scene(rng)["objects"]) for _ in range(n)]


def test_builtin_covers_every_shapes_caption():
    tok = make_tokenizer("builtin:shapes")
    captions = _shapes_captions()
    ids = tok(captions)
    assert ids.shape == (len(captions), 77)
    # Every caption word is a whole-word token: no [UNK], and no spelled-out characters.
    assert not np.isin(ids, [tok.unk_id]).any()
    for c in captions:
        assert not any(t.startswith(("_", "##")) for t in tok.tokenize(c)), c
        assert tok.decode(tok([c])[0]) == c
    assert max(len(tok.encode(c)) for c in captions) <= 77


def test_builtin_unknown_words_and_determinism(caplog):
    tok = ShapesTokenizer(max_length=12)
    assert tok.vocab_size == len(set(tok.id_to_token)) and tok.pad_id == 0
    assert tok.tokenize("A Zebra, 42!") == ["a", "_z", "##e", "##b", "##r", "##a", ",", "_4", "##2", "!"]
    assert tok.tokenize("café") == ["_c", "##a", "##f", "[UNK]"]
    assert tok.decode(tok(["a zebra near a red star"])[0]) == "a zebra near a red star"
    # Ids are fixed by the vocabulary order: a new instance (or process) gives the same ones.
    ids = tok(["a red circle"])
    assert ids.tolist() == ShapesTokenizer(max_length=12)(["a red circle"]).tolist()
    assert ids[0, :5].tolist() == [tok.bos_id, tok.vocab["a"], tok.vocab["red"], tok.vocab["circle"], tok.eos_id]
    assert (tok.vocab["a"], tok.vocab["red"], tok.vocab["circle"]) == (4, 25, 44)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        long = tok(["a red circle " * 10])
    assert long[0, -1] == tok.eos_id and long[0, 0] == tok.bos_id and len(caplog.records) == 1
    assert tok.empty.tolist() == [tok.bos_id, tok.eos_id] + [0] * 10
