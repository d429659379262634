"""Moved to :mod:`clx.assets.tokenize` (text → padded int32 token ids; no JAX).

Kept so that ``from clx.models.tokenize import TextTokenizer`` keeps working.
"""

from clx.assets.tokenize import BUCKETS, TextTokenizer, bucket_length

__all__ = ["BUCKETS", "TextTokenizer", "bucket_length"]
