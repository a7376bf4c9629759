"""The token cache on disk: what a split's tokens and a trained tokenizer are stored as.

Under the cache directory, each file name carries a digest of everything its content depends on
(its key), so a changed corpus, config or tokenizer gets a new file and never a stale one:
  tokenizer-<kind>-<digest>.json    a trained char or bpe tokenizer (its own JSON)
  tokens-<split>-<digest>.bin       the split's token ids, raw uint16 (or uint32 above 65536 ids)
  tokens-<split>-<digest>.json      metadata: key, vocab_size, dtype, n_tokens, n_bytes, unit, n_units,
                                    n_stories, unk_count, split; written last, so it marks the pair complete
Every file is written atomically (records.atomic_write).

Legend: T tokens.
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from ..records import atomic_write

CACHE_VERSION = 2  # 2: unmarked text is split by a block at a story start; meta says the unit


def digest(obj) -> str:
    """Short stable hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_path(cache_dir: str, kind: str, key: dict) -> Path:
    return Path(cache_dir) / f"tokenizer-{kind}-{digest(key)}.json"


def tokens_stem(cache_dir: str, split: str, key: dict) -> Path:
    """STEM of the STEM.bin / STEM.json pair holding one split's tokens."""
    return Path(cache_dir) / f"tokens-{split}-{digest(key)}"


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
