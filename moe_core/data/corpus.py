"""Corpora: parse a spec, read its stories, split them into train and validation.

Corpus specs:
  synthetic            procedural children's stories (moe_core.data.synthetic), the offline default
  tinystories          roneneldan/TinyStories from the Hugging Face hub (train / validation)
  tinystories:DIR      the same dataset from local parquet shards (DIR/**/train-*.parquet,
                       DIR/**/validation-*.parquet, as the hub lays them out), same code path
  text:PATH[,PATH...]  plain text: stories separated by <|endoftext|> (if the file has one) or
                       else by blank lines; a path written val=PATH is official validation text
Sources without an official validation split are split by story (hash of seed and story index),
so no story is on both sides and the split stays stable as the corpus grows.
"""
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import require
from . import synthetic

SPLITS = ("train", "validation")
CORPORA = ("synthetic", "tinystories", "tinystories:DIR", "text:PATH[,PATH...]")
EOT = "<|endoftext|>"
TINYSTORIES_HUB = "roneneldan/TinyStories"


@dataclass(frozen=True)
class CorpusSource:
    """A parsed corpus spec."""

    kind: str  # "synthetic" | "tinystories" | "text"
    train_paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()
    local_dir: str | None = None  # tinystories:DIR


def parse_corpus(spec: str) -> CorpusSource:
    """Syntax only (no file access), so configs validate cheaply."""
    require(isinstance(spec, str), "corpus", f"the spec must be a string, got {spec!r}")
    kind, sep, rest = spec.partition(":")
    if spec in ("synthetic", "tinystories"):
        return CorpusSource(spec)
    if kind == "tinystories" and rest:
        return CorpusSource("tinystories", local_dir=rest)
    require(kind == "text" and bool(sep), "corpus",
            f"unknown corpus spec {spec!r}; expected one of {', '.join(CORPORA)}")
    paths = [p.strip() for p in rest.split(",")]
    require(all(paths), "corpus", f"spec {spec!r} has an empty path")
    train = tuple(p for p in paths if not p.startswith("val="))
    val = tuple(p.removeprefix("val=") for p in paths if p.startswith("val="))
    require(bool(train), "corpus", f"spec {spec!r} has no training path (only val=...)")
    return CorpusSource("text", train, val)


def parquet_shards(local_dir: str, split: str) -> list[str]:
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"TinyStories directory not found: {local_dir}")
    shards = sorted(str(p) for p in root.rglob(f"{split}-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no {split}-*.parquet shards under {local_dir}")
    return shards


def source_files(source: CorpusSource) -> list[str]:
    """Every local file the source reads; raises FileNotFoundError naming the first missing one."""
    if source.local_dir is not None:
        return [f for split in SPLITS for f in parquet_shards(source.local_dir, split)]
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
    require(split in SPLITS, "split", f"unknown split {split!r}; expected one of {SPLITS}")
    source = parse_corpus(spec)
    source_files(source)
    if source.kind == "tinystories":
        if source.local_dir is None:
            stories = _hf_stories(TINYSTORIES_HUB, None, split, cache_dir, max_stories)
        else:
            shards = {split: parquet_shards(source.local_dir, split)}
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
    require(bool(stories), "corpus", f"{spec!r} has no stories in split {split!r} (empty corpus?)")
    return stories
