"""Text → fixed-length int32 token ids, with length buckets so jit compiles rarely.

Wraps a Hugging Face ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``.
Padding and truncation stored in the file are switched off (the MiniLM file
pads every text to 128); clx truncates to ``max_length`` itself and pads with
``pad_id`` to a *bucket* length: the smallest of :data:`BUCKETS` (capped at
``max_length``) that holds the longest text of the call. Models then see only a
handful of sequence lengths, so a jitted forward compiles once per bucket.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

BUCKETS = (16, 32, 64, 128, 256, 512)


def bucket_length(length: int, max_length: int, buckets: Sequence[int] = BUCKETS) -> int:
  """Smallest of ``buckets`` below ``max_length``, or ``max_length``, that is ``>= length``."""
  if length > max_length:
    raise ValueError(f"length {length} exceeds max_length {max_length}")
  for b in sorted(set(b for b in buckets if b < max_length) | {max_length}):
    if b >= length:
      return b
  return max_length  # unreachable: max_length >= length


class TextTokenizer:
  """A ``tokenizers.Tokenizer`` producing padded int32 id arrays.

  Attributes:
    tokenizer: the underlying ``tokenizers.Tokenizer`` (padding and truncation off).
    pad_id: id used for padding (the model's attention mask is ``ids != pad_id``).
    max_length: default maximum number of tokens per text, special tokens included.
    vocab_size: number of ids the tokenizer can emit (added tokens included).
  """

  def __init__(self, tokenizer, *, pad_id: int, max_length: int):
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self.tokenizer = tokenizer
    self.pad_id = int(pad_id)
    self.max_length = int(max_length)
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, pad_id: int | None = None,
                max_length: int = 512) -> "TextTokenizer":
    """Loads ``tokenizer.json``; ``pad_id`` defaults to the id of its ``[PAD]``/padding token.

    Raises:
      ValueError: ``pad_id`` is given and disagrees with the tokenizer's pad token,
        or no pad id can be found.
    """
    try:
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError("clx text models need the `tokenizers` package "
                        "(a core dependency of clx: pip install tokenizers)") from e
    tokenizer = Tokenizer.from_file(os.fspath(path))
    padding = tokenizer.padding
    file_pad = padding["pad_id"] if padding else tokenizer.token_to_id("[PAD]")
    if pad_id is None:
      if file_pad is None:
        raise ValueError(f"{path}: no padding config and no [PAD] token; pass pad_id explicitly")
      pad_id = file_pad
    elif file_pad is not None and int(file_pad) != int(pad_id):
      raise ValueError(f"{path}: the tokenizer pads with id {file_pad} but the model's pad_id is "
                       f"{pad_id}; the attention mask (ids != pad_id) would be wrong")
    return cls(tokenizer, pad_id=int(pad_id), max_length=max_length)

  def encode_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Unpadded ids per text, truncated to ``max_length`` (special tokens kept)."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not a single string")
    max_length = self.max_length if max_length is None else int(max_length)
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2, got {max_length}")
    self.tokenizer.enable_truncation(max_length=max_length)
    try:
      encodings = self.tokenizer.encode_batch(list(texts))
    finally:
      self.tokenizer.no_truncation()
    return [e.ids for e in encodings]

  def __call__(self, texts: Sequence[str], max_length: int | None = None, *,
               bucket: bool = True, length: int | None = None) -> np.ndarray:
    """Token ids ``(n, L)`` int32, right-padded with ``pad_id``.

    Args:
      texts: ``n`` strings.
      max_length: truncate each text to this many tokens (default ``self.max_length``).
      bucket: pad to the bucket of the longest text (see :func:`bucket_length`);
        ``False`` pads to the longest text exactly.
      length: pad every row to exactly this length instead (``>=`` the longest
        text after truncation), e.g. to stack several calls.

    Returns:
      int32 array ``(n, L)``.
    """
    max_length = self.max_length if max_length is None else int(max_length)
    ids = self.encode_ids(texts, max_length)
    longest = max((len(i) for i in ids), default=1)
    if length is not None:
      if length < longest:
        raise ValueError(f"length={length} is shorter than the longest text ({longest} tokens)")
      target = int(length)
    else:
      target = bucket_length(longest, max_length) if bucket else longest
    out = np.full((len(ids), target), self.pad_id, np.int32)
    for row, seq in enumerate(ids):
      out[row, :len(seq)] = seq
    return out
