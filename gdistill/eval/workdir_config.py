"""The config of an existing workdir, as a config file: ``get_config('DIR')``.

``python -m gdistill.evaluate --workdir=DIR`` uses it when ``--config`` is absent:
the run's recorded DIR/config.json laid over ``base_config()`` (so sections added
since the run was started, such as ``eval``, get their defaults), after which
``--config.eval.*=...`` overrides apply as with any config file.
"""

from __future__ import annotations

import json
import os

import ml_collections

from gdistill import storage
from gdistill.config_base import base_config
from gdistill.workdir import CONFIG_FILE


def _overlay(c: ml_collections.ConfigDict, d: dict) -> None:
  for k, v in d.items():
    if isinstance(v, dict) and isinstance(c.get(k), ml_collections.ConfigDict):
      _overlay(c[k], v)
    elif isinstance(v, dict):
      c[k] = ml_collections.ConfigDict(v)
    elif isinstance(v, list):  # JSON turned the config's tuples into lists
      c[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    elif k in c and isinstance(c[k], float) and isinstance(v, int) and not isinstance(v, bool):
      c[k] = float(v)
    else:
      c[k] = v


def config_from_dict(recorded: dict) -> ml_collections.ConfigDict:
  """A recorded config (a workdir's config.json, a weights file's sidecar) over
  ``base_config()``."""
  c = base_config()
  _overlay(c, recorded)
  return c


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  return config_from_dict(json.loads(storage.read_text(path)))
