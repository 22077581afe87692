"""Today's configs compute bit-identically to the code before the denoiser protocol.

``protocol_golden.compute`` runs the losses (with gradients), the stage-1, stage-2 and
encoder targets and every compiled sampler on fixed inputs with a tiny perturbed U-Net;
``tests/data/protocol_golden.npz`` holds what the code at ``GOLDEN_COMMIT`` computed on
this kind of machine (its docstring says how to remake it). Slow: ~20 compilations.
"""

import os

import numpy as np
import pytest

import protocol_golden

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'protocol_golden.npz')


@pytest.mark.slow
def test_bit_identical_to_the_code_before_the_protocol():
  want = dict(np.load(GOLDEN))
  got = protocol_golden.compute()
  assert sorted(got) == sorted(want)
  differ = [k for k in want if not np.array_equal(got[k], want[k])]
  assert not differ, (f'{len(differ)} of {len(want)} arrays differ from main at '
                      f'{protocol_golden.GOLDEN_COMMIT}, e.g. {differ[:5]}')
