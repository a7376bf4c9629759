"""Tokenizers: characters of the train split, our byte-level BPE, or a Hugging Face hub tokenizer.

All three encode whole documents to int64 id arrays and save to / load from one JSON string, which
the token cache stores next to the tokens it produced.
"""
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..config import require

TOKENIZERS = ("char", "bpe", "hf:NAME")
# BPE merges saturate long before the full TinyStories train split (~1.9 GB); cap the training text.
BPE_TRAIN_CHARS = 50_000_000


def parse_tokenizer(spec: str) -> tuple[str, str | None]:
    """'char' | 'bpe' | 'hf:NAME' -> (kind, hub name)."""
    if spec in ("char", "bpe"):
        return spec, None
    require(isinstance(spec, str) and spec.startswith("hf:") and len(spec) > 3, "tokenizer",
            f"unknown tokenizer {spec!r}; expected one of {', '.join(TOKENIZERS)}")
    return "hf", spec[3:]


class CharTokenizer:
    """Characters of the train split; id 0 (unk_id) stands for characters unseen in training."""

    unk_id = 0

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars) + 1
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        # Dense code point -> id table; its last slot (unk) catches every code point above the vocab.
        self._table = np.full(int(codes.max(initial=0)) + 2, self.unk_id, dtype=np.int64)
        self._table[codes] = np.arange(1, self.vocab_size)

    @classmethod
    def train(cls, docs: Sequence[str]) -> "CharTokenizer":
        return cls("".join(sorted(set("".join(docs)))))

    def to_json(self) -> str:
        return json.dumps({"char_vocab": self.chars})

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        return cls(json.loads(text)["char_vocab"])

    def encode_array(self, text: str) -> np.ndarray:
        """Vectorized table lookup: no Python loop over the characters of a large split."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return self._table[np.minimum(codes, len(self._table) - 1)]

    def encode_docs(self, docs: Sequence[str]) -> np.ndarray:
        return self.encode_array("".join(docs))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer: our byte-level BPE or a hub tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        unk = getattr(tok.model, "unk_token", None)
        self.unk_id = tok.token_to_id(unk) if unk else None

    @classmethod
    def train_bpe(cls, docs: Sequence[str], vocab_size: int) -> "HFTokenizer":
        """Byte-level BPE (GPT-2 style): no unknown tokens, exact round trip."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_prefix_by_chars(docs, BPE_TRAIN_CHARS), trainer)
        return cls(tok)

    @classmethod
    def from_hub(cls, name: str, cache_dir: str) -> "HFTokenizer":
        from huggingface_hub import hf_hub_download
        from tokenizers import Tokenizer

        try:
            path = hf_hub_download(name, "tokenizer.json", cache_dir=str(Path(cache_dir) / "hf_hub"))
        except OSError as err:
            raise ConnectionError(f"hf tokenizer {name!r}: cannot get tokenizer.json from the Hugging "
                                  f"Face hub ({type(err).__name__}); offline? use 'char' or 'bpe'") from None
        return cls(Tokenizer.from_file(path))

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> "HFTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def encode_docs(self, docs: Sequence[str]) -> np.ndarray:
        encodings = self.tok.encode_batch(list(docs), add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings])

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


Tokenizer = CharTokenizer | HFTokenizer


def _prefix_by_chars(docs: Sequence[str], max_chars: int) -> Iterator[str]:
    total = 0
    for doc in docs:
        if total >= max_chars:
            return
        total += len(doc)
        yield doc
