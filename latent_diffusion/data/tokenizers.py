"""Prompt tokenizers: text -> fixed-length int32 ids for the text encoders.

`make_tokenizer(spec)` with spec
  'clip:<dir or hub id>'  transformers CLIPTokenizer (SD v1/v2 style: BOS ... EOS, padded),
  'bert:<dir or hub id>'  transformers BertTokenizerFast WordPiece ([CLS] ... [SEP] [PAD]..., LDM paper),
  'builtin:shapes'        a word-level tokenizer built in code for the synthetic shapes captions;
                          needs no files, and spells unknown words out in characters.
Every tokenizer pads to `max_length`, truncates longer prompts (keeping the end token) with
one logged warning per batch, and gives the empty prompt's ids for classifier-free guidance.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _warn_truncated(lengths: Sequence[int], texts: Sequence[str], max_length: int) -> None:
    over = [i for i, n in enumerate(lengths) if n > max_length]
    if over:
        first = texts[over[0]]
        log.warning("%d of %d prompt(s) exceed the %d-token context and were truncated (first: %d tokens, %r)",
                    len(over), len(texts), max_length, lengths[over[0]],
                    first if len(first) <= 80 else first[:77] + "...")


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("tokenizer: expected a list of prompts, got a single string; wrap it in a list")
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("tokenizer: expected at least one prompt")
    return texts


class HFTokenizer:
    """A transformers tokenizer padded and truncated to a fixed context."""

    def __init__(self, tokenizer, max_length: int = 77, name: str = ""):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no pad token; it cannot pad prompts to a fixed length")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.name = name
        self.pad_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.empty = self([""])[0]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _as_list(texts)
        full = self.tokenizer(texts, truncation=False, padding=False)["input_ids"]
        _warn_truncated([len(ids) for ids in full], texts, self.max_length)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding="max_length")["input_ids"]
        return np.asarray(ids, dtype=np.int32)


SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
# Fixed order: ids are part of every checkpoint trained with this tokenizer; append, never reorder.
WORDS = (
    # the shapes captions: "a small red circle at the top left, ... and a large blue star in the center"
    "a", "an", "the", "and", "at", "on", "in", "of", "with", "to", "is", "are", "there", "here",
    "tiny", "small", "medium", "large", "big", "huge", "little",
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray",
    "grey", "cyan", "magenta", "violet", "dark", "light", "bright", "pale",
    "circle", "square", "triangle", "diamond", "star", "rectangle", "ellipse", "oval", "hexagon",
    "pentagon", "heart", "cross", "ring", "dot", "circles", "squares", "triangles", "diamonds", "stars",
    "shape", "shapes", "object", "objects",
    "top", "bottom", "left", "right", "center", "centre", "middle", "upper", "lower", "corner",
    "side", "edge", "above", "below", "under", "over", "beside", "between", "behind", "front", "near",
    "next", "no", "one", "two", "three", "four", "five", "several", "some", "many",
    "image", "picture", "photo", "background", "plain", "empty", "nothing",
)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
PUNCTUATION = tuple(",.;:!?'\"-()/&+")
_PIECE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class ShapesTokenizer:
    """Word-level tokenizer over the shapes vocabulary; other words are spelled in characters.

    Sequence: [BOS] tokens [EOS] [PAD]...; an unknown word becomes '_c' (its first character)
    followed by '##c' pieces, so any ASCII text encodes without [UNK] and word boundaries survive.
    """

    def __init__(self, max_length: int = 77):
        if max_length < 2:
            raise ValueError(f"builtin tokenizer: max_length must hold [BOS] and [EOS], got {max_length}")
        self.max_length = int(max_length)
        tokens = list(SPECIALS) + list(WORDS) + [f"_{c}" for c in _CHARS] + [f"##{c}" for c in _CHARS]
        tokens += list(PUNCTUATION)
        self.vocab = {t: i for i, t in enumerate(tokens)}
        if len(self.vocab) != len(tokens):
            raise AssertionError("builtin tokenizer: duplicate token in the vocabulary")
        self.id_to_token = tokens
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.vocab[t] for t in SPECIALS)
        self.vocab_size = len(tokens)
        self.empty = self([""])[0]

    def tokenize(self, text: str) -> list[str]:
        out = []
        for piece in _PIECE.findall(text.lower()):
            if piece in self.vocab:
                out.append(piece)
            elif piece[0] in _CHARS:
                out += [f"_{piece[0]}"] + [f"##{c}" for c in piece[1:]]
            else:
                out.append("[UNK]")
        return out

    def encode(self, text: str) -> list[int]:
        """Ids with [BOS]/[EOS], not truncated or padded."""
        return [self.bos_id] + [self.vocab[t] for t in self.tokenize(text)] + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        words: list[str] = []
        for i in ids:
            tok = self.id_to_token[int(i)]
            if tok in ("[PAD]", "[BOS]", "[EOS]"):
                continue
            if tok.startswith("##") and words:
                words[-1] += tok[2:]
            else:
                words.append(tok[1:] if tok.startswith("_") else tok)
        return " ".join(words).replace(" ,", ",")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _as_list(texts)
        encoded = [self.encode(t) for t in texts]
        _warn_truncated([len(e) for e in encoded], texts, self.max_length)
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        for row, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                ids = ids[:self.max_length - 1] + [self.eos_id]
            out[row, :len(ids)] = ids
        return out


def _load_hf(kind: str, source: str, max_length: int) -> HFTokenizer:
    from transformers import BertTokenizerFast, CLIPTokenizer

    cls = CLIPTokenizer if kind == "clip" else BertTokenizerFast
    path = source
    # A diffusers pipeline folder keeps its tokenizer in a subfolder.
    if os.path.isdir(os.path.join(source, "tokenizer")):
        path = os.path.join(source, "tokenizer")
    try:
        tok = cls.from_pretrained(path)
    except Exception as e:
        raise ValueError(
            f"could not load the {kind} tokenizer from {source!r} ({type(e).__name__}: {e}). Give a local "
            "folder with its vocabulary files (CLIP: vocab.json + merges.txt; BERT: vocab.txt), or a hub id "
            "already in the Hugging Face cache (there may be no network here).") from e
    return HFTokenizer(tok, max_length, name=f"{kind}:{source}")


def make_tokenizer(spec: str, max_length: int = 77):
    """A tokenizer from a spec string: 'clip:<dir or id>', 'bert:<dir or id>' or 'builtin:shapes'."""
    kind, sep, source = str(spec).partition(":")
    if kind in ("clip", "bert") and sep and source:
        return _load_hf(kind, source, max_length)
    if kind == "builtin" and source == "shapes":
        return ShapesTokenizer(max_length)
    raise ValueError(f"unknown tokenizer spec {spec!r}; expected 'clip:<dir or hub id>', "
                     "'bert:<dir or hub id>' or 'builtin:shapes'")
