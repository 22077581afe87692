"""Where a run's files live: a local directory or Cloud Storage (``gs://bucket/path``).

gdistill keeps paths as strings (messages show them as the user gave them) and reads,
lists and writes them through ``etils.epath``, the path library Orbax uses, so that
every file of a workdir goes where its checkpoints go. ``gs://`` needs gcsfs
(``pip install 'gdistill[gcs]'``) and the usual Google credentials; nothing here
knows about emulators (tests point the Google clients at one through their own
environment variables).

Two differences from a local disk shape the helpers: Cloud Storage has no directories
(a prefix exists once an object is under it, ``mkdir`` does nothing) and no rename
(a "rename" copies every object), while one object upload is atomic. So a write is
tmp + rename on a local disk and one upload on ``gs://``, and local paths are made
absolute but URLs are left alone (``os.path.abspath('gs://b/r')`` names a local
``gs:/b/r``).
"""

from __future__ import annotations

import io
import os
from typing import Callable, Union

from etils import epath

PathLike = Union[str, os.PathLike]

# gcsfs caches directory listings forever by default, so a process would not see what
# another process (the next host, a rerun, TensorStore writing a checkpoint's arrays)
# wrote after it first listed a prefix: every host must see the same workdir.
try:
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)
except ImportError:  # no fsspec: no gs:// either (check_reachable says so)
  pass


class StorageError(ValueError):
  """A path gdistill cannot reach (an unsupported scheme, gcsfs missing)."""


def is_remote(path: PathLike) -> bool:
  """A URL (``gs://...``) rather than a local path."""
  return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def check_reachable(path: PathLike, flag: str = '--workdir') -> None:
  """Raises StorageError (one line) when ``path``'s scheme cannot be used here."""
  path = os.fspath(path)
  if not is_remote(path):
    return
  scheme = path.split('://', 1)[0]
  if scheme != 'gs':
    raise StorageError(f'{flag}={path}: only local paths and gs:// are supported')
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise StorageError(f'{flag}={path}: Cloud Storage needs gcsfs: pip install '
                       f'\'gdistill[gcs]\' (or pip install gcsfs)') from None


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: PathLike) -> bool:
  """A local directory, or a ``gs://`` prefix that holds at least one object."""
  return epath.Path(path).is_dir()


def isfile(path: PathLike) -> bool:
  return epath.Path(path).is_file()


def listdir(path: PathLike) -> list[str]:
  """Names in the directory ``path``; [] when it does not exist."""
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def makedirs(path: PathLike) -> None:
  """Creates a local directory (and its parents); nothing to do on Cloud Storage."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
  """Removes a file; nothing if it is gone already."""
  try:
    epath.Path(path).unlink()
  except FileNotFoundError:
    pass


def write_bytes(path: PathLike, data: bytes, *, tmp_suffix: str = '.tmp') -> None:
  """Writes ``path`` whole or not at all: locally through ``path + tmp_suffix`` and a
  rename (the parent directories are created); on Cloud Storage one upload, which is
  atomic itself."""
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + tmp_suffix
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_with(path: PathLike, save: Callable[[io.BytesIO], None], *,
               tmp_suffix: str = '.tmp') -> None:
  """``save(file)`` into memory, then ``write_bytes``: for writers that take a file
  object (PIL, numpy, matplotlib)."""
  buffer = io.BytesIO()
  save(buffer)
  write_bytes(path, buffer.getvalue(), tmp_suffix=tmp_suffix)


def create_new(path: PathLike, data: bytes) -> bool:
  """Creates ``path`` holding ``data`` if nothing is there; False if something is.

  Atomic against a concurrent creator: ``O_EXCL`` locally, the upload precondition
  "no live generation" (``ifGenerationMatch=0``) on Cloud Storage.
  """
  path = os.fspath(path)
  if is_remote(path):
    try:
      fsspec.filesystem('gcs').pipe_file(path, data, mode='create')
    except FileExistsError:
      return False
    except OSError as e:  # the first write of a command: say why in one line
      reason = 'no such bucket' if isinstance(e, FileNotFoundError) else f'{e}'.splitlines()[0]
      raise StorageError(f'cannot write {path}: {reason} (check the bucket name and your '
                         f'Google credentials)') from None
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  return True
