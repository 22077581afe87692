"""Removes the empty scratch directories TFDS leaves in the temporary directory.

For a dataset that is not prepared, ``tfds.builder`` (``DatasetInfo.
initialize_from_bucket``) makes ``mkdtemp('tfds')`` for metadata from its bucket
and, with the bucket off (TFDS's default), returns without removing it: one
empty ``/tmp/tmp*tfds`` directory per builder made, every run and every test.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def _scratch_dirs() -> set[str]:
  """The ``tmp*tfds`` directories in the temporary directory."""
  root = tempfile.gettempdir()
  try:
    names = os.listdir(root)
  except OSError:
    return set()
  return {os.path.join(root, n) for n in names
          if n.startswith('tmp') and n.endswith('tfds')}


@contextlib.contextmanager
def removed() -> Iterator[None]:
  """Removes the empty ``tmp*tfds`` directories made while the block runs."""
  before = _scratch_dirs()
  try:
    yield
  finally:
    for path in _scratch_dirs() - before:
      try:
        os.rmdir(path)  # only an empty directory; anything else stays
      except OSError:
        pass
