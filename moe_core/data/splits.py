"""Train/validation splits that keep every story on one side, and the measure that checks it.

A corpus reaches the split as a list of units: stories where the source marks them (the synthetic
corpus, text with <|endoftext|>, TinyStories' own splits), else paragraphs (blank-line separated
text, where one story spans several paragraphs). Two ways to split:

- ``hash``: unit i is in validation when a hash of (seed, i) falls below val_fraction. Stable as the
  corpus grows; story-disjoint only when the units are stories. On paragraphs it leaks: the other
  paragraphs of a validation paragraph's story are in train (the rare-word leak below sees it).
- ``block``: validation is one contiguous block at the end of the corpus holding about
  val_fraction of its characters; its first unit is a story start (a paragraph that opens with a
  TinyStories opener such as "Once upon a time"), so no story straddles the boundary unless that
  opener starts a paragraph inside a story. Without a story start near the target the block starts
  at the nearest paragraph and at most one story straddles.

``auto`` (the default) is ``hash`` for story units and ``block`` for paragraphs.
"""
import hashlib
import re
from collections import Counter
from collections.abc import Sequence

SPLIT_METHODS = ("auto", "hash", "block")
# Story openers of TinyStories; on tinystories_val.txt (4,302 paragraphs) they mark 788 starts.
STORY_OPENER = re.compile(r"(Once upon a time|Once,? there (was|were|lived)|There (once|was once)|"
                          r"(Long,? long|A long time) ago)")
WORD = re.compile(r"\w+")


def is_story_start(paragraph: str) -> bool:
    """True when the paragraph opens like a TinyStories story (high precision, not full recall)."""
    return STORY_OPENER.match(paragraph) is not None


def count_stories(paragraphs: Sequence[str]) -> int:
    """Stories touched by consecutive paragraphs: the story starts found, plus the story the first
    paragraph continues when it is not a start. A lower bound where openers are missed."""
    starts = sum(map(is_story_start, paragraphs))
    return starts + (1 if paragraphs and not is_story_start(paragraphs[0]) else 0)


def _is_val(index: int, val_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def split_stories(stories: Sequence[str], split: str, val_fraction: float, seed: int) -> list[str]:
    """Hash split by unit index: deterministic, stable as the corpus grows."""
    want_val = split == "validation"
    return [s for i, s in enumerate(stories) if _is_val(i, val_fraction, seed) == want_val]


def block_start(units: Sequence[str], val_fraction: float, starts: Sequence[bool]) -> tuple[int, bool]:
    """(index of the first validation unit, whether it is a story start) for a block at the end
    holding about val_fraction of the characters: the story start whose block share is nearest
    val_fraction, if one lies within val_fraction/2 of it; else the nearest unit boundary."""
    total = sum(len(u) for u in units)
    shares, tail = [0.0] * len(units), 0
    for i in range(len(units) - 1, -1, -1):
        tail += len(units[i])
        shares[i] = tail / total
    candidates = range(1, len(units))  # train keeps at least one unit
    nearest = min(candidates, key=lambda i: (abs(shares[i] - val_fraction), -i), default=None)
    if nearest is None:
        return len(units), False
    on_start = [i for i in candidates if starts[i] and abs(shares[i] - val_fraction) <= val_fraction / 2]
    if on_start:
        return min(on_start, key=lambda i: (abs(shares[i] - val_fraction), -i)), True
    return nearest, False


def rare_word_leak(train_docs: Sequence[str], val_docs: Sequence[str], max_count: int = 2) -> float:
    """Share of the rare-word occurrences of validation that also occur in train, rare meaning seen
    at most max_count times in train and validation together. Character names and other story-
    specific words are rare, so a validation story whose other parts are in train scores high: on
    tinystories_val.txt 0.44 for a random 5% paragraph split, 0.29 for the last 5% of paragraphs
    (the level of unrelated stories sharing an uncommon word). NaN without rare words."""
    train_words = [w for d in train_docs for w in WORD.findall(d)]
    val_words = [w for d in val_docs for w in WORD.findall(d)]
    counts = Counter(train_words) + Counter(val_words)
    in_train = set(train_words)
    rare = [w for w in val_words if counts[w] <= max_count]
    return sum(w in in_train for w in rare) / len(rare) if rare else float("nan")
