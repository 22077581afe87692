"""Today's configs compute bit-identically to the code before the denoiser protocol.

``protocol_golden.compute`` runs the losses (with gradients), the stage-1, stage-2 and
encoder targets and every compiled sampler on fixed inputs with a tiny perturbed U-Net. The
reference is what the code at ``GOLDEN_COMMIT`` computes on this same machine: the test
unpacks that commit from the repository's history (``git archive``) and runs
``protocol_golden`` with it in a subprocess. Computed here, not stored: XLA's CPU code, and so
the float32 roundoff, depends on the machine (a file made on one machine's CPU differed from
the same code on another in 935 of 952 arrays, by ~1e-7). Skips where the history is absent
(a shallow clone, an sdist). Slow: ~20 compilations, twice.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import protocol_golden
from gd_testlib import unpack_commit

TESTS = os.path.dirname(os.path.abspath(__file__))


def reference(dest: str) -> dict:
  """What the code at ``GOLDEN_COMMIT`` computes on this machine (8 CPU devices, as here)."""
  base = os.path.join(dest, 'base')
  unpack_commit(protocol_golden.GOLDEN_COMMIT, base)
  out = os.path.join(dest, 'reference.npz')
  # The old gdistill first on the path (an editable install would find today's), today's
  # protocol_golden (the same computation, written for either API) after it.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([base, TESTS]))
  subprocess.run([sys.executable, '-m', 'protocol_golden', out], cwd=base, env=env, check=True)
  return dict(np.load(out))


@pytest.mark.slow
def test_bit_identical_to_the_code_before_the_protocol(tmp_path, devices8):
  del devices8  # the same device count as the subprocess (XLA's CPU thread split)
  want = reference(str(tmp_path))
  got = protocol_golden.compute()
  assert sorted(got) == sorted(want)
  differ = [k for k in want if not np.array_equal(got[k], want[k])]
  assert not differ, (f'{len(differ)} of {len(want)} arrays differ from the code at '
                      f'{protocol_golden.GOLDEN_COMMIT}, e.g. {differ[:5]}')
