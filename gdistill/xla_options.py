"""Per-program XLA compile options, and ahead-of-time compilation with them.

On CPU, XLA (jaxlib 0.10) hands convolutions, matmuls, reductions and
elementwise fusions to YNNPACK. YNNPACK's weight-gradient convolutions run at
a quarter of the speed of its forward ones on the 2-core development CPU
(3x3 convolution, 64 channels, 32x28x28: 144 against 33 GFLOP/s on one
core), where XLA's own (Eigen) convolutions run at 118 and 83-97. So on CPU
gdistill compiles its train steps and samplers with YNNPACK kept for
reductions only (``CPU_TUNED``): Fashion-MNIST teacher step 10% faster in one
process, interleaved. Adding ``LIBRARY_FUSION_TYPE_ELTWISE`` was faster still
(teacher 0.77 against 0.93 s with Flax's layers and XLA's defaults) but XLA
then failed at run time on the ImageNet-64 config at tiny size ("Instruction
with unsupported layout in YNN fusion"), so it is left out. ``config.cpu_xla_tuned=False``
keeps XLA's defaults. The options only concern the CPU backend; on GPU and
TPU nothing is passed.

The option is experimental in XLA: a jaxlib that does not know it rejects it
at compile time; the program is then compiled with XLA's defaults, with one
warning.
"""

from __future__ import annotations

import logging
from typing import Optional

import jax

CPU_TUNED = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_REDUCE',
}

_rejected: set = set()  # option sets this jaxlib refused (warned about once)


def compile_options(config, platform: Optional[str] = None) -> dict:
  """The options for a program of this config on ``platform`` (default: JAX's backend)."""
  platform = platform or jax.default_backend()
  if platform == 'cpu' and config.get('cpu_xla_tuned', True):
    return dict(CPU_TUNED)
  return {}


def compile(lowered, options: Optional[dict] = None):  # pylint: disable=redefined-builtin
  """``lowered.compile()`` with ``options``; XLA's defaults where it rejects them."""
  key = tuple(sorted((options or {}).items()))
  if key and key not in _rejected:
    try:
      return lowered.compile(compiler_options=dict(options))
    except jax.errors.JaxRuntimeError as e:
      if 'option' not in str(e):
        raise
      _rejected.add(key)
      logging.warning('XLA rejected the compile options %s (%s); compiling with XLA\'s '
                      'defaults (config.cpu_xla_tuned=False skips them)', dict(options),
                      str(e).splitlines()[0])
  return lowered.compile()
