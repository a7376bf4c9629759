"""Corpora: parse a spec, read its stories, split them into train and validation.

Corpus specs:
  synthetic            procedural children's stories (moe_core.data.synthetic), the offline default
  tinystories          roneneldan/TinyStories from the Hugging Face hub (train / validation)
  tinystories:DIR      the same dataset from local parquet shards (DIR/**/train-*.parquet,
                       DIR/**/validation-*.parquet, as the hub lays them out), same code path
  text:PATH[,PATH...]  plain text: stories separated by <|endoftext|> (if every file has one),
                       else paragraphs separated by blank lines; a path written val=PATH is
                       official validation text
Sources without an official validation split are split as ``splits`` describes: stories by a
hash of (seed, index), paragraphs by a contiguous block at the end that starts at a story start,
so that no story is on both sides.
"""
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import require
from . import synthetic
from .splits import SPLIT_METHODS, block_start, count_stories, is_story_start, split_stories

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


def read_units(path: str) -> tuple[list[str], str]:
    """(units, unit) of one text file: its stories ("story") if it has <|endoftext|> markers, as the
    TinyStories authors' files do, else its blank-line separated paragraphs ("paragraph")."""
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    marked = EOT in text
    parts = text.split(EOT) if marked else re.split(r"\n[ \t]*\n", text)
    return [p.strip() for p in parts if p.strip()], "story" if marked else "paragraph"


def read_stories(path: str) -> list[str]:
    """Units of one text file: stories where marked, else paragraphs (see read_units)."""
    return read_units(path)[0]


def format_stories(stories: Sequence[str]) -> str:
    """Inverse of read_stories (stories may contain blank lines, so separate them by EOT)."""
    return f"\n{EOT}\n".join(stories) + "\n"


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


@dataclass(frozen=True)
class CorpusSplit:
    """One split's documents and what they are, for the data record."""

    docs: list[str]  # in corpus order
    unit: str  # "story" | "paragraph"
    method: str  # "official" | "hash" | "block"
    n_stories: int  # exact for story units; for paragraphs the story starts found (count_stories)
    boundary: str  # block: "story start" | "paragraph"; else "" (hash and official splits have none)


def _own_split(units: list[str], unit: str, split: str, method: str, val_fraction: float,
               seed: int) -> tuple[list[str], str, str]:
    """(docs, method, boundary) of a source without an official validation split."""
    method = ("hash" if unit == "story" else "block") if method == "auto" else method
    if method == "hash":
        return split_stories(units, split, val_fraction, seed), method, ""
    starts = [unit == "story" or is_story_start(u) for u in units]
    cut, on_start = block_start(units, val_fraction, starts)
    return (units[cut:] if split == "validation" else units[:cut]), method, \
        "story start" if on_start else "paragraph"


def read_split(spec: str, split: str, *, cache_dir: str = ".cache/moe_core", max_stories: int | None = None,
               val_fraction: float = 0.05, seed: int = 0, synthetic_chars: int = 2_000_000,
               split_method: str = "auto") -> CorpusSplit:
    """One split of a corpus and its description. max_stories caps the units read (per split where
    the source has an official validation split, else before the split)."""
    require(split in SPLITS, "split", f"unknown split {split!r}; expected one of {SPLITS}")
    require(split_method in SPLIT_METHODS, "split_method",
            f"unknown {split_method!r}; valid: {', '.join(SPLIT_METHODS)}")
    source = parse_corpus(spec)
    source_files(source)
    unit, method, boundary = "story", "official", ""
    if source.kind == "tinystories":
        if source.local_dir is None:
            docs = _hf_stories(TINYSTORIES_HUB, None, split, cache_dir, max_stories)
        else:
            shards = {split: parquet_shards(source.local_dir, split)}
            docs = _hf_stories("parquet", shards, split, cache_dir, max_stories)
    else:
        if source.kind == "synthetic":
            units = synthetic.generate_stories(synthetic_chars, seed)
        else:
            paths = source.val_paths if source.val_paths and split == "validation" else source.train_paths
            files = [read_units(p) for p in paths]
            units = [u for file_units, _ in files for u in file_units]
            unit = "story" if all(kind == "story" for _, kind in files) else "paragraph"
        units = units[:max_stories]
        if source.val_paths:
            docs = units
        else:
            docs, method, boundary = _own_split(units, unit, split, split_method, val_fraction, seed)
    require(bool(docs), "corpus", f"{spec!r} has no stories in split {split!r} (empty corpus?)")
    n_stories = len(docs) if unit == "story" else count_stories(docs)
    return CorpusSplit(docs, unit, method, n_stories, boundary)


def load_corpus(spec: str, split: str, **kw) -> list[str]:
    """The documents of one split (keywords as read_split)."""
    return read_split(spec, split, **kw).docs
