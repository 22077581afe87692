"""Every shipped config's phases are wired as they were before the methods registry owned
each kind's loss binding, meta, grids, in-training quality and serving (commit 91d6c7d):
``registry_golden.describe`` of each config equals ``tests/data/registry_golden.json``,
which the same function made on that commit (its docstring says how). The maths behind
the bindings is pinned by test_protocol_golden (slow)."""

import json
import os

import pytest

import registry_golden

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, 'tests', 'data', 'registry_golden.json')


@pytest.mark.parametrize('name', registry_golden.CONFIGS)
def test_config_wired_as_before(name):
  want = json.load(open(GOLDEN))[name]
  got = json.loads(json.dumps(registry_golden.describe(REPO, name), sort_keys=True))
  assert sorted(got) == sorted(want)
  for phase in want:
    assert got[phase] == want[phase], phase
