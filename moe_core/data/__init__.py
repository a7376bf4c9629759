"""Corpora, tokenizers, token cache and batches for the MoE routing study.

Why this shape: every run must see the same text, the same tokens and the same batches for a
given config and seed (also across DDP ranks and resumes), evaluation must be cheap and
comparable across tokenizers (loss per token and bits per byte), and CI must work offline.

Corpus specs:
  synthetic            procedural children's stories (moe_core.synthetic), the offline default
  tinystories          roneneldan/TinyStories from the Hugging Face hub (train / validation)
  tinystories:DIR      the same dataset from local parquet shards (DIR/**/train-*.parquet,
                       DIR/**/validation-*.parquet, as the hub lays them out), same code path
  text:PATH[,PATH...]  plain text: stories separated by <|endoftext|> (if the file has one) or
                       else by blank lines; a path written val=PATH is official validation text
Sources without an official validation split are split by story (hash of seed and story index).

The token stream of a split is its stories, each followed by DOC_SEP, so all tokenizers see the
same bytes and bits per byte compare across them.

Legend: B batch, S seq len, T tokens, W windows.
"""

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..records import atomic_write
from . import synthetic

SPLITS = ("train", "validation")
CORPORA = ("synthetic", "tinystories", "tinystories:DIR", "text:PATH[,PATH...]")
TOKENIZERS = ("char", "bpe", "hf:NAME")
EOT = "<|endoftext|>"
DOC_SEP = "\n\n"
TINYSTORIES_HUB = "roneneldan/TinyStories"
CACHE_VERSION = 1
# BPE merges saturate long before the full TinyStories train split (~1.9 GB); cap the training text.
BPE_TRAIN_CHARS = 50_000_000


@dataclass(frozen=True)
class CorpusSource:
    """A parsed corpus spec."""

    kind: str  # "synthetic" | "tinystories" | "text"
    train_paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()
    local_dir: str | None = None  # tinystories:DIR


def parse_corpus(spec: str) -> CorpusSource:
    """Syntax only (no file access), so configs validate cheaply."""
    if not isinstance(spec, str):
        raise ValueError(f"corpus spec must be a string, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if spec in ("synthetic", "tinystories"):
        return CorpusSource(spec)
    if kind == "tinystories" and rest:
        return CorpusSource("tinystories", local_dir=rest)
    if kind == "text" and sep:
        paths = [p.strip() for p in rest.split(",")]
        if not all(paths):
            raise ValueError(f"corpus spec {spec!r} has an empty path")
        train = tuple(p for p in paths if not p.startswith("val="))
        val = tuple(p.removeprefix("val=") for p in paths if p.startswith("val="))
        if not train:
            raise ValueError(f"corpus spec {spec!r} has no training path (only val=...)")
        return CorpusSource("text", train, val)
    raise ValueError(f"unknown corpus spec {spec!r}; expected one of {', '.join(CORPORA)}")


def parse_tokenizer(spec: str) -> tuple[str, str | None]:
    """'char' | 'bpe' | 'hf:NAME' -> (kind, hub name)."""
    if spec in ("char", "bpe"):
        return spec, None
    if isinstance(spec, str) and spec.startswith("hf:") and len(spec) > 3:
        return "hf", spec[3:]
    raise ValueError(f"unknown tokenizer {spec!r}; expected one of {', '.join(TOKENIZERS)}")


def _parquet_shards(local_dir: str, split: str) -> list[str]:
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"TinyStories directory not found: {local_dir}")
    shards = sorted(str(p) for p in root.rglob(f"{split}-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no {split}-*.parquet shards under {local_dir}")
    return shards


def _source_files(source: CorpusSource) -> list[str]:
    """Every local file the source reads; raises FileNotFoundError naming the first missing one."""
    if source.local_dir is not None:
        return [f for split in SPLITS for f in _parquet_shards(source.local_dir, split)]
    for path in (*source.train_paths, *source.val_paths):
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus text file not found: {path}")
    return [*source.train_paths, *source.val_paths]


def read_stories(path: str) -> list[str]:
    """Stories of one text file in the TinyStories authors' format."""
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    parts = text.split(EOT) if EOT in text else re.split(r"\n[ \t]*\n", text)
    return [p.strip() for p in parts if p.strip()]


def format_stories(stories: Sequence[str]) -> str:
    """Inverse of read_stories (stories may contain blank lines, so separate them by EOT)."""
    return f"\n{EOT}\n".join(stories) + "\n"


def _is_val(index: int, val_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def split_stories(stories: Sequence[str], split: str, val_fraction: float, seed: int) -> list[str]:
    """Deterministic split by story index: no story on both sides, stable as the corpus grows."""
    want_val = split == "validation"
    return [s for i, s in enumerate(stories) if _is_val(i, val_fraction, seed) == want_val]


def _hf_stories(path: str, data_files: dict | None, split: str, cache_dir: str,
                max_stories: int | None) -> list[str]:
    """One `datasets` path for the hub (path=name) and local files (path=builder, data_files)."""
    import datasets

    selection = split if max_stories is None else f"{split}[:{max_stories}]"
    try:
        ds = datasets.load_dataset(path, data_files=data_files, split=selection,
                                   cache_dir=str(Path(cache_dir) / "hf_datasets"))
    except ConnectionError as err:
        raise ConnectionError(f"cannot load {path!r} from the Hugging Face hub ({err}); offline? "
                              "use corpus 'tinystories:DIR' (parquet shards) or 'text:PATH'") from None
    return [t.strip() for t in ds["text"] if t and t.strip()]


def load_corpus(spec: str, split: str, *, cache_dir: str = ".cache/moe_core",
                max_stories: int | None = None, val_fraction: float = 0.05, seed: int = 0,
                synthetic_chars: int = 2_000_000) -> list[str]:
    """Stories of one split. max_stories caps the stories read (per split where the source has
    an official validation split, else before the story-level split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    source = parse_corpus(spec)
    _source_files(source)
    if source.kind == "tinystories":
        if source.local_dir is None:
            stories = _hf_stories(TINYSTORIES_HUB, None, split, cache_dir, max_stories)
        else:
            shards = {split: _parquet_shards(source.local_dir, split)}
            stories = _hf_stories("parquet", shards, split, cache_dir, max_stories)
    elif source.val_paths:
        paths = source.val_paths if split == "validation" else source.train_paths
        stories = [s for p in paths for s in read_stories(p)][:max_stories]
    else:
        if source.kind == "synthetic":
            every = synthetic.generate_stories(synthetic_chars, seed)
        else:
            every = [s for p in source.train_paths for s in read_stories(p)]
        stories = split_stories(every[:max_stories], split, val_fraction, seed)
    if not stories:
        raise ValueError(f"corpus {spec!r} has no stories in split {split!r} (empty corpus?)")
    return stories


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


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest cache dtype that holds every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_token_cache(stem: Path, ids_T: np.ndarray, meta: dict) -> tuple[np.memmap, dict]:
    """Tokens to STEM.bin, then metadata to STEM.json (the JSON marks the pair complete)."""
    dtype = token_dtype(meta["vocab_size"])
    meta = {**meta, "dtype": dtype.name}
    atomic_write(stem.with_suffix(".bin"), lambda tmp: tmp.write_bytes(ids_T.astype(dtype).tobytes()))
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_bytes(json.dumps(meta, indent=1).encode()))
    return np.memmap(stem.with_suffix(".bin"), dtype=dtype, mode="r"), meta


def read_token_cache(stem: Path, key: dict) -> tuple[np.memmap, dict] | None:
    """(tokens, meta) if STEM.json describes `key` and STEM.bin is complete, else None (stale)."""
    bin_path, meta_path = stem.with_suffix(".bin"), stem.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        fresh = (meta["key"] == key and dtype == token_dtype(meta["vocab_size"]) and meta["n_tokens"] > 0
                 and bin_path.stat().st_size == meta["n_tokens"] * dtype.itemsize)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (np.memmap(bin_path, dtype=dtype, mode="r"), meta) if fresh else None


def _require(ok: bool, field: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"DataConfig.{field} must be {rule}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    """What text, which tokens, how long the windows; seed drives the synthetic corpus and the split."""

    corpus: str = "synthetic"
    tokenizer: str = "char"
    vocab_size: int = 512  # bpe only; char takes its vocabulary from the train split
    seq_len: int = 128
    cache_dir: str = ".cache/moe_core"
    synthetic_chars: int = 2_000_000
    max_stories: int | None = None
    val_fraction: float = 0.05
    eval_windows: int = 64
    seed: int = 0

    def __post_init__(self):
        parse_corpus(self.corpus)
        kind, _ = parse_tokenizer(self.tokenizer)
        low = 256 if kind == "bpe" else 1  # bpe starts from the 256-byte alphabet
        _require(_is_int(self.vocab_size) and self.vocab_size >= low, "vocab_size", f"an int >= {low}",
                 self.vocab_size)
        for field in ("seq_len", "synthetic_chars", "eval_windows"):
            value = getattr(self, field)
            _require(_is_int(value) and value >= 1, field, "an int >= 1", value)
        _require(self.max_stories is None or (_is_int(self.max_stories) and self.max_stories >= 1),
                 "max_stories", "None or an int >= 1", self.max_stories)
        _require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1,
                 "val_fraction", "a number in (0, 1)", self.val_fraction)
        _require(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0", self.seed)
        _require(isinstance(self.cache_dir, str) and bool(self.cache_dir), "cache_dir",
                 "a non-empty path", self.cache_dir)


def _corpus_key(cfg: DataConfig, source: CorpusSource) -> dict:
    """Everything the stories depend on, including the files' and the generator's state."""
    files = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in _source_files(source)]
    generator = Path(synthetic.__file__).read_bytes() if source.kind == "synthetic" else b""
    return {"version": CACHE_VERSION, "corpus": cfg.corpus, "files": files,
            "generator_sha": hashlib.sha256(generator).hexdigest()[:16],
            "synthetic_chars": cfg.synthetic_chars, "max_stories": cfg.max_stories,
            "val_fraction": cfg.val_fraction, "seed": cfg.seed}


def _load_tokenizer(cfg: DataConfig, corpus_key: dict, train_docs: Callable[[], list[str]]) -> Tokenizer:
    """Hub tokenizer, or char/bpe trained on the train split once and then reloaded from the cache."""
    kind, name = parse_tokenizer(cfg.tokenizer)
    if kind == "hf":
        return HFTokenizer.from_hub(name, cfg.cache_dir)
    cls = CharTokenizer if kind == "char" else HFTokenizer
    params = {"tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size if kind == "bpe" else None}
    path = Path(cfg.cache_dir) / f"tokenizer-{kind}-{_digest({**corpus_key, **params})}.json"
    if path.is_file():
        return cls.from_json(path.read_text())
    tok = CharTokenizer.train(train_docs()) if kind == "char" else HFTokenizer.train_bpe(train_docs(), cfg.vocab_size)
    atomic_write(path, lambda tmp: tmp.write_bytes(tok.to_json().encode()))
    return tok


def _split_tokens(cfg: DataConfig, corpus_key: dict, tok: Tokenizer, split: str,
                  docs: Callable[[str], list[str]]) -> tuple[np.memmap, dict]:
    """Cached tokens of one split, rebuilt when the metadata does not match this config."""
    key = {**corpus_key, "split": split, "tokenizer": cfg.tokenizer,
           "tokenizer_sha": hashlib.sha256(tok.to_json().encode()).hexdigest()[:16]}
    stem = Path(cfg.cache_dir) / f"tokens-{split}-{_digest(key)}"
    cached = read_token_cache(stem, key)
    if cached is None:
        split_docs = docs(split)
        ids_T = tok.encode_docs(split_docs)
        meta = {"key": key, "vocab_size": tok.vocab_size, "n_tokens": len(ids_T),
                "n_bytes": sum(len(d.encode()) for d in split_docs), "n_stories": len(split_docs),
                "unk_count": 0 if tok.unk_id is None else int((ids_T == tok.unk_id).sum())}
        cached = write_token_cache(stem, ids_T, meta)
    tokens_T, meta = cached
    if len(tokens_T) < cfg.seq_len + 1:
        raise ValueError(f"{split} split of corpus {cfg.corpus!r} has {len(tokens_T)} tokens, fewer than "
                         f"one window of seq_len + 1 = {cfg.seq_len + 1}")
    return tokens_T, {**meta, "cache": str(stem.with_suffix(".bin"))}


def _windows(tokens_T: np.ndarray, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows tokens[start : start + seq_len + 1] as (inputs, next-token targets), int64."""
    rows_BS = np.asarray(tokens_T[starts_B[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    rows_BS = torch.from_numpy(rows_BS)
    return rows_BS[:, :-1].contiguous(), rows_BS[:, 1:].contiguous()


class TokenData:
    """Token streams of both splits plus the batch contracts of INTERFACES.md."""

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
                     "eval_windows_used": n_eval,
                     "val_bytes_per_token": self.val_bytes_per_token, "val_unk_count": self.val_unk_count,
                     "splits": {s: {k: v for k, v in m.items() if k != "key"} for s, (_, m) in splits.items()},
                     "cache_key": _digest(train_meta["key"])}

    def train_batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank `rank`'s rows of the world_size*batch_size random windows drawn for (seed, step)."""
        for name, value, low in (("step", step, 0), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("world_size", world_size, 1)):
            if not _is_int(value) or value < low:
                raise ValueError(f"train_batch {name} must be an int >= {low}, got {value!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"train_batch rank must be in [0, {world_size}), got {rank!r}")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train_T) - self.cfg.seq_len, size=world_size * batch_size)
        return _windows(self.train_T, starts[rank * batch_size:(rank + 1) * batch_size], self.cfg.seq_len)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same fixed validation windows every call; the last batch may be smaller."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"eval_batches batch_size must be an int >= 1, got {batch_size!r}")
        for i in range(0, len(self.eval_starts_W), batch_size):
            yield _windows(self.val_T, self.eval_starts_W[i:i + batch_size], self.cfg.seq_len)


def load_data(cfg: DataConfig) -> TokenData:
    """Tokens for cfg, from the cache when fresh; the corpus is read only when something is missing."""
    source = parse_corpus(cfg.corpus)
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    corpus_key = _corpus_key(cfg, source)  # raises FileNotFoundError before any expensive work

    @cache
    def docs(split: str) -> list[str]:
        stories = load_corpus(cfg.corpus, split, cache_dir=cfg.cache_dir, max_stories=cfg.max_stories,
                              val_fraction=cfg.val_fraction, seed=cfg.seed,
                              synthetic_chars=cfg.synthetic_chars)
        return [s + DOC_SEP for s in stories]

    tok = _load_tokenizer(cfg, corpus_key, lambda: docs("train"))
    return TokenData(cfg, tok, {s: _split_tokens(cfg, corpus_key, tok, s, docs) for s in SPLITS})

