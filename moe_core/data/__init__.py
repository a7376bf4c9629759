"""Data for the MoE routing study: corpus -> tokenizer -> token cache -> batches.

Why this shape: every run must see the same text, the same tokens and the same batches for a
given config and seed (also across DDP ranks and resumes), evaluation must be cheap and
comparable across tokenizers (loss per token and bits per byte), and CI must work offline.

The pipeline, one module per stage: ``corpus`` parses the spec and reads the stories or paragraphs
(``synthetic`` generates the offline corpus), ``splits`` holds them out story-disjointly (and
measures the leak), ``tokenizers`` turns text into ids, ``cache`` stores
tokens and trained tokenizers on disk; here, ``load_data`` ties them together for a
:class:`DataConfig` and :class:`TokenData` cuts the token streams into batches.

The token stream of a split is its documents (stories, or paragraphs of unmarked text), each
followed by DOC_SEP, so all tokenizers see the same bytes and bits per byte compare across them.
The record (``TokenData.meta``) says which: ``split`` = {method, unit, val_fraction, boundary} and
per split n_units, n_stories (exact for stories, story starts found for paragraphs).

Legend: B batch, S seq len, T tokens, W windows.
"""
import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import require
from ..records import atomic_write
from . import synthetic
from .cache import CACHE_VERSION, digest, read_token_cache, token_dtype, tokenizer_path, tokens_stem, write_token_cache
from .corpus import (
    SPLITS,
    CorpusSource,
    CorpusSplit,
    format_stories,
    load_corpus,
    parse_corpus,
    read_split,
    read_stories,
    source_files,
)
from .splits import SPLIT_METHODS, is_story_start, rare_word_leak, split_stories
from .tokenizers import CharTokenizer, HFTokenizer, Tokenizer, parse_tokenizer

__all__ = ["DOC_SEP", "SPLITS", "SPLIT_METHODS", "CharTokenizer", "DataConfig", "HFTokenizer", "TokenData",
           "Tokenizer", "format_stories", "is_story_start", "load_corpus", "load_data", "rare_word_leak", "read_split",
           "read_stories", "read_token_cache", "split_stories", "token_dtype", "write_token_cache"]

DOC_SEP = "\n\n"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """What text, which tokens, how long the windows; seed drives the synthetic corpus and the hash
    split. ``split_method``: "auto" (hash for stories, block for paragraphs), "hash" or "block"
    (moe_core.data.splits); eval_windows above the validation split's windows means all of them."""

    corpus: str = "synthetic"
    tokenizer: str = "char"
    vocab_size: int = 512  # bpe only; char takes its vocabulary from the train split
    seq_len: int = 128
    cache_dir: str = ".cache/moe_core"
    synthetic_chars: int = 2_000_000
    max_stories: int | None = None
    val_fraction: float = 0.05
    split_method: str = "auto"
    eval_windows: int = 64
    seed: int = 0

    def __post_init__(self):
        parse_corpus(self.corpus)
        kind, _ = parse_tokenizer(self.tokenizer)
        low = 256 if kind == "bpe" else 1  # bpe starts from the 256-byte alphabet
        require(_is_int(self.vocab_size) and self.vocab_size >= low, "DataConfig.vocab_size",
                f"must be an int >= {low} for tokenizer {self.tokenizer!r}, got {self.vocab_size!r}")
        for name in ("seq_len", "synthetic_chars", "eval_windows"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, f"DataConfig.{name}", f"must be an int >= 1, got {value!r}")
        require(self.max_stories is None or (_is_int(self.max_stories) and self.max_stories >= 1),
                "DataConfig.max_stories", f"must be None or an int >= 1, got {self.max_stories!r}")
        require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1,
                "DataConfig.val_fraction", f"must be a number in (0, 1), got {self.val_fraction!r}")
        require(self.split_method in SPLIT_METHODS, "DataConfig.split_method",
                f"unknown {self.split_method!r}; valid: {', '.join(SPLIT_METHODS)}")
        require(_is_int(self.seed) and self.seed >= 0, "DataConfig.seed", f"must be an int >= 0, got {self.seed!r}")
        require(isinstance(self.cache_dir, str) and bool(self.cache_dir), "DataConfig.cache_dir",
                f"must be a non-empty path, got {self.cache_dir!r}")

def _corpus_key(cfg: DataConfig, source: CorpusSource) -> dict:
    """Everything the stories depend on, including the files' and the generator's state."""
    files = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in source_files(source)]
    generator = Path(synthetic.__file__).read_bytes() if source.kind == "synthetic" else b""
    return {"version": CACHE_VERSION, "corpus": cfg.corpus, "files": files,
            "generator_sha": hashlib.sha256(generator).hexdigest()[:16],
            "synthetic_chars": cfg.synthetic_chars, "max_stories": cfg.max_stories,
            "val_fraction": cfg.val_fraction, "split_method": cfg.split_method, "seed": cfg.seed}


def _load_tokenizer(cfg: DataConfig, corpus_key: dict, train_docs: Callable[[], list[str]]) -> Tokenizer:
    """Hub tokenizer, or char/bpe trained on the train split once and then reloaded from the cache."""
    kind, name = parse_tokenizer(cfg.tokenizer)
    if kind == "hf":
        return HFTokenizer.from_hub(name, cfg.cache_dir)
    cls = CharTokenizer if kind == "char" else HFTokenizer
    params = {"tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size if kind == "bpe" else None}
    path = tokenizer_path(cfg.cache_dir, kind, {**corpus_key, **params})
    if path.is_file():
        return cls.from_json(path.read_text())
    tok = CharTokenizer.train(train_docs()) if kind == "char" else HFTokenizer.train_bpe(train_docs(), cfg.vocab_size)
    atomic_write(path, lambda tmp: tmp.write_bytes(tok.to_json().encode()))
    return tok


def _split_tokens(cfg: DataConfig, corpus_key: dict, tok: Tokenizer, split: str,
                  read: Callable[[str], CorpusSplit]) -> tuple[np.memmap, dict]:
    """Cached tokens of one split, rebuilt when the metadata does not match this config."""
    key = {**corpus_key, "split": split, "tokenizer": cfg.tokenizer,
           "tokenizer_sha": hashlib.sha256(tok.to_json().encode()).hexdigest()[:16]}
    stem = tokens_stem(cfg.cache_dir, split, key)
    cached = read_token_cache(stem, key)
    if cached is None:
        part = read(split)
        split_docs = [d + DOC_SEP for d in part.docs]
        ids_T = tok.encode_docs(split_docs)
        meta = {"key": key, "vocab_size": tok.vocab_size, "n_tokens": len(ids_T),
                "n_bytes": sum(len(d.encode()) for d in split_docs), "unit": part.unit, "n_units": len(split_docs),
                "n_stories": part.n_stories, "unk_count": 0 if tok.unk_id is None else int((ids_T == tok.unk_id).sum()),
                "split": {"method": part.method, "unit": part.unit, "val_fraction": cfg.val_fraction,
                          "boundary": part.boundary}}
        cached = write_token_cache(stem, ids_T, meta)
    tokens_T, meta = cached
    require(len(tokens_T) >= cfg.seq_len + 1, "corpus", f"the {split} split of {cfg.corpus!r} has {len(tokens_T)} "
            f"tokens, fewer than one window of seq_len + 1 = {cfg.seq_len + 1}")
    return tokens_T, {**meta, "cache": str(stem.with_suffix(".bin"))}


def _windows(tokens_T: np.ndarray, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows tokens[start : start + seq_len + 1] as (inputs, next-token targets), int64."""
    rows_BS = np.asarray(tokens_T[starts_B[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    rows_BS = torch.from_numpy(rows_BS)
    return rows_BS[:, :-1].contiguous(), rows_BS[:, 1:].contiguous()


class TokenData:
    """Token streams of both splits and their batches: ``train_batch`` draws random windows seeded by
    (seed, step), each DDP rank taking its slice of the one global batch; ``eval_batches`` walks the
    same fixed validation windows every time."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, splits: dict[str, tuple[np.memmap, dict]]):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.train_T, train_meta = splits["train"]
        self.val_T, val_meta = splits["validation"]
        self.val_bytes_per_token = val_meta["n_bytes"] / val_meta["n_tokens"]
        self.val_unk_count = val_meta["unk_count"]
        # Evenly spaced non-overlapping windows over the whole val split (cheap, comparable evals).
        slots = len(self.val_T) // (cfg.seq_len + 1)
        n_eval = min(cfg.eval_windows, slots)
        self.eval_starts_W = (np.arange(n_eval) * slots // n_eval) * (cfg.seq_len + 1)
        self.meta = {**asdict(cfg), "config_vocab_size": cfg.vocab_size, "vocab_size": self.vocab_size,
                     "eval_windows_used": n_eval, "eval_coverage": n_eval * (cfg.seq_len + 1) / len(self.val_T),
                     "val_bytes_per_token": self.val_bytes_per_token, "val_unk_count": self.val_unk_count,
                     "split": val_meta["split"],
                     "splits": {s: {k: v for k, v in m.items() if k not in ("key", "split")}
                                for s, (_, m) in splits.items()},
                     "cache_key": digest(train_meta["key"])}

    def train_token_counts(self) -> np.ndarray:
        """[V] count of each token id in the train split (what a frequency-balanced hash table balances)."""
        return np.bincount(np.asarray(self.train_T), minlength=self.vocab_size)

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s rows of the world_size*batch_size random windows drawn for (seed, step)."""
        for name, value, low in (("step", step, 0), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("world_size", world_size, 1)):
            require(_is_int(value) and value >= low, name, f"train_batch needs an int >= {low}, got {value!r}")
        require(_is_int(rank) and 0 <= rank < world_size, "rank",
                f"train_batch needs a rank in [0, {world_size}), got {rank!r}")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train_T) - self.cfg.seq_len, size=world_size * batch_size)
        return _windows(self.train_T, starts[rank * batch_size:(rank + 1) * batch_size], self.cfg.seq_len)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same fixed validation windows every call; the last batch may be smaller."""
        require(_is_int(batch_size) and batch_size >= 1, "batch_size",
                f"eval_batches needs an int >= 1, got {batch_size!r}")
        for i in range(0, len(self.eval_starts_W), batch_size):
            yield _windows(self.val_T, self.eval_starts_W[i:i + batch_size], self.cfg.seq_len)


def load_data(cfg: DataConfig) -> TokenData:
    """Tokens for cfg, from the cache when fresh; the corpus is read only when something is missing."""
    source = parse_corpus(cfg.corpus)
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    corpus_key = _corpus_key(cfg, source)  # raises FileNotFoundError before any expensive work

    @functools.cache  # (functools by name: ``cache`` is the sibling module)
    def read(split: str) -> CorpusSplit:
        return read_split(cfg.corpus, split, cache_dir=cfg.cache_dir, max_stories=cfg.max_stories,
                          val_fraction=cfg.val_fraction, seed=cfg.seed, synthetic_chars=cfg.synthetic_chars,
                          split_method=cfg.split_method)

    tok = _load_tokenizer(cfg, corpus_key, lambda: [d + DOC_SEP for d in read("train").docs])
    return TokenData(cfg, tok, {s: _split_tokens(cfg, corpus_key, tok, s, read) for s in SPLITS})

