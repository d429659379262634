"""Files out of pinned Debian packages: ``.deb`` reading and a sha256-checked cache (no JAX).

A :class:`DebAsset` names a package and the files to take from it, each with
its pinned sha256. :func:`fetch_deb_members` finds them in the clx cache, in a
``.deb`` placed in ``<cache>/debs``, in the installed package's files, or by
``apt-get download`` into a temporary folder (unless ``$CLX_OFFLINE``); the
``.deb`` is read with a small ``ar`` reader plus :mod:`tarfile` (no ``dpkg``,
no root). The cache root and locking are those of :mod:`clx.assets.wheels`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping

from clx.assets import wheels
from clx.assets.wheels import (AssetChecksumError, AssetUnavailableError, _atomic_write,
                               _file_lock, _verified)


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


SYSTEM_ROOTS: tuple[str, ...] = ("/",)  # where an installed package's files are looked for
APT_TIMEOUT_S = 180


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
  root = wheels.cache_dir(cache)
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
    got = wheels.sha256_of(contents[member])
    if expected and got != expected:
      raise AssetChecksumError(f"{member} from {origin} has sha256 {got}, expected the pinned "
                               f"{expected}; refusing to use it")
  for member in asset.members:
    name = pathlib.PurePosixPath(member).name
    _atomic_write(target / name, contents[member])


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
  return {"source": "deb", "deb": deb.name, "deb_sha256": wheels.sha256_of(data),
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
  root = wheels.cache_dir(cache)
  target = root / "assets" / asset.name
  paths = {m: target / pathlib.PurePosixPath(m).name for m in asset.members}

  def ready() -> bool:
    return all(_verified(paths[m], sha) for m, sha in asset.members.items())

  if ready():
    return paths
  with _file_lock(root / "locks" / f"{asset.name}.lock"):
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
        if all(f.is_file() and wheels.sha256_of(f) == sha
               for (m, f), sha in zip(files.items(), asset.members.values())):
          _write_members({m: f.read_bytes() for m, f in files.items()}, asset, target, system_root)
          info = {"source": "installed", "root": system_root}
          break
    if info is None:
      if wheels.is_offline():
        raise AssetUnavailableError(
            f"{asset.package} ({', '.join(asset.members)}) is not in the clx cache and "
            f"CLX_OFFLINE is set, so apt-get will not be run. Fetch it by hand:\n"
            f"{manual_deb_commands(asset, cache)}" +
            (f"\nPlaced packages that were rejected: {errors}" if errors else ""))
      with tempfile.TemporaryDirectory(prefix="clx-apt-") as workdir:
        deb = _apt_download(asset, workdir, timeout_s, cache)
        info = _extract_deb(deb, asset, target)
    info["members"] = dict(asset.members)
    _atomic_write(target / "source.json", json.dumps(info, indent=1, sort_keys=True).encode())
  if not ready():
    raise AssetChecksumError(f"cached members in {target} do not match their pinned sha256")
  return paths
