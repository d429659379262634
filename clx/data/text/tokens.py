"""Tokenisation glue: text columns → int32 token ids, cached on disk and in-process.

The tokenizer itself is :class:`clx.assets.tokenize.TextTokenizer`; model names
resolve through :mod:`clx.assets.hub`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import re
import threading
from collections.abc import Callable

import numpy as np

from clx.assets import hub, wheels
from clx.assets.tokenize import TextTokenizer
from clx.assets.wheels import _atomic_write
from clx.data.text.datasets import _LOADED, _LOADED_LOCK, TEXT_BUILDERS, load_text_dataset


DEFAULT_MAX_LENGTH = 64
DEFAULT_TOKENIZER = "all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------------
# Tokenisation with an on-disk cache

_TOKENS: dict[str, np.ndarray] = {}
_TOKENS_LOCK = threading.Lock()
_TEXT_HASHES: dict[int, tuple[object, str]] = {}


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "tokenizer"


def _text_hash(texts: np.ndarray) -> str:
  cached = _TEXT_HASHES.get(id(texts))
  if cached is not None and cached[0] is texts:
    return cached[1]
  digest = hashlib.sha256()
  for text in texts:
    digest.update(text.encode("utf-8"))
    digest.update(b"\0")
  value = digest.hexdigest()[:12]
  _TEXT_HASHES[id(texts)] = (texts, value)
  return value


def resolve_tokenizer(tokenizer="all-MiniLM-L6-v2", *,
                      cache: str | os.PathLike | None = None) -> tuple[str, Callable[[], object]]:
  """A cache key and a loader for a tokenizer spec.

  Args:
    tokenizer: a known model name (``"all-MiniLM-L6-v2"``: key from the pinned
      sha256 of its ``tokenizer.json``, loaded only on a cache miss), a model
      folder holding ``tokenizer.json``, a ``tokenizer.json`` path, a
      :class:`~clx.assets.tokenize.TextTokenizer`, or an object whose
      ``.tokenizer`` is one (e.g. a ``SentenceEncoder``).
    cache: clx cache root for the model asset.

  Returns:
    ``(key, load)``: a filesystem-safe key naming the tokenizer (name and
    content hash) and a function returning the ``TextTokenizer``.
  """
  if isinstance(tokenizer, (str, os.PathLike)):
    text = os.fspath(tokenizer)
    spec = hub.PRETRAINED.get(text.lower())
    path = pathlib.Path(text).expanduser()
    if spec is not None and not path.exists():
      member = next(m for m in spec.asset.members if m.endswith("/tokenizer.json"))
      key = f"{_slug(spec.name)}-{spec.asset.members[member][:12]}"
      return key, lambda: TextTokenizer.from_file(
          hub.fetch_pretrained(text, cache=cache) / "tokenizer.json")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise ValueError(f"tokenizer {text!r} is neither a known model ({hub.known_models()}) nor "
                       f"a tokenizer.json file or a folder holding one")
    name = path.name if path.is_dir() else path.parent.name
    return (f"{_slug(name)}-{wheels.sha256_of(file)[:12]}",
            lambda: TextTokenizer.from_file(file))
  tok = tokenizer if isinstance(tokenizer, TextTokenizer) else getattr(tokenizer, "tokenizer", None)
  if not isinstance(tok, TextTokenizer):
    raise TypeError(f"tokenizer must be a model name, a tokenizer.json path/folder, a "
                    f"TextTokenizer or an object with a TextTokenizer .tokenizer, got "
                    f"{type(tokenizer).__name__}")
  digest = hashlib.sha256(f"{tok.tokenizer.to_str()}\0pad={tok.pad_id}".encode()).hexdigest()
  return f"custom-{digest[:12]}", lambda: tok


def token_ids(name: str, split: str, *, field: str = "text", tokenizer="all-MiniLM-L6-v2",
              max_length: int = DEFAULT_MAX_LENGTH, data_dir: str | os.PathLike | None = None,
              asset_cache: str | os.PathLike | None = None) -> np.ndarray:
  """Token ids of every record of one split, cached on disk (read-only int32 ``(n, max_length)``).

  Every row is truncated to ``max_length`` tokens (special tokens included)
  and right-padded with the tokenizer's pad id (0 for MiniLM). The ``.npy``
  lives at ``<cache>/text_tokens/<dataset>-<version>/<field>-<texts hash>/
  <tokenizer key>-L<max_length>/<split>.npy`` (written atomically).

  Args:
    name: a :data:`TEXT_BUILDERS` name.
    split: ``"train"`` or ``"test"``.
    field: the text column (``"text"``; WordNet also ``"definition"``, ``"lemmas"``).
    tokenizer: see :func:`resolve_tokenizer`.
    max_length: tokens per row, >= 2.
    data_dir, asset_cache: as in :func:`load_text_dataset`.
  """
  if (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
      or max_length < 2):
    raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
  data = load_text_dataset(name, data_dir, asset_cache=asset_cache)
  if split not in data:
    raise KeyError(f"{name} has no split {split!r}; splits: {sorted(data)}")
  builder = TEXT_BUILDERS[name]
  if field not in builder.TEXT_FIELDS:
    raise ValueError(f"{name} has text fields {builder.TEXT_FIELDS}, not {field!r}")
  texts = data[split][field]
  key, load = resolve_tokenizer(tokenizer, cache=asset_cache)
  path = (wheels.cache_dir(asset_cache) / "text_tokens" / f"{name}-{builder.VERSION}" /
          f"{field}-{_text_hash(texts)}" / f"{key}-L{int(max_length)}" / f"{split}.npy")
  with _TOKENS_LOCK:
    if str(path) in _TOKENS:
      return _TOKENS[str(path)]
  ids = None
  if path.is_file():
    with contextlib.suppress(ValueError, OSError):
      ids = np.load(path, allow_pickle=False)
      if ids.shape != (len(texts), int(max_length)) or ids.dtype != np.int32:
        ids = None
  if ids is None:
    tok = load()
    ids = tok(list(texts), int(max_length), bucket=False, length=int(max_length))
    buffer = io.BytesIO()
    np.save(buffer, ids, allow_pickle=False)
    _atomic_write(path, buffer.getvalue())
  ids.setflags(write=False)
  with _TOKENS_LOCK:
    _TOKENS[str(path)] = ids
  return ids


def clear_cache() -> None:
  """Forgets the in-process datasets and token arrays (the disk caches stay)."""
  with _LOADED_LOCK:
    _LOADED.clear()
  with _TOKENS_LOCK:
    _TOKENS.clear()
  _TEXT_HASHES.clear()
