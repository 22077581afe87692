"""Per-program XLA compile options, and ahead-of-time compilation with them.

On CPU, XLA (jaxlib 0.10) hands convolutions, matmuls, reductions and
elementwise fusions to YNNPACK. YNNPACK's weight-gradient convolutions run at
a quarter of the speed of its forward ones on the 2-core development CPU
(3x3 convolution, 64 channels, 32x28x28: 144 against 33 GFLOP/s on one
core), where XLA's own (Eigen) convolutions run at 118 and 83-97. So on CPU
gdistill compiles its train steps and samplers with YNNPACK kept for
reductions and elementwise fusions only (``CPU_TUNED``): weight-gradient
convolutions and standalone matmuls run in Eigen, while XLA puts the forward
convolutions, with the elementwise ops after them, into YNNPACK fusions.
Fashion-MNIST teacher step (one lowered program, interleaved in one process):
616 ms with these options, 687 ms with reductions only, 769 ms with XLA's
defaults.
``config.cpu_xla_tuned=False`` keeps XLA's defaults. The options only concern
the CPU backend; on GPU and TPU nothing is passed.

Two ways the options can fail, both handled here:
- a jaxlib that does not know the (experimental) option rejects it at compile
  time: the program is compiled with XLA's defaults, with one warning;
- XLA can give an instruction inside a YNNPACK elementwise fusion a layout
  that YNNPACK does not take (non-descending, seen where FSDP leaves a
  convolution 3 output channels per device) and only fails when the program
  first runs ("Instruction with unsupported layout in YNN fusion"). Every
  compiled program is checked for such fusions (``ynn_layout_problems``, the
  same rule XLA's YNNPACK emitter applies) and, where there are any,
  recompiled with the next option set of ``FALLBACKS``.
"""

from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional

import jax

YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
CPU_TUNED = {YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE'}
# Where a program compiled with an option set has a YNNPACK fusion that would
# fail at run time, the next set to try (reductions only: 687 against 616 ms
# above, and still faster than XLA's defaults).
FALLBACKS = {
    tuple(sorted(CPU_TUNED.items())): {YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_REDUCE'},
}
YNN_MAX_TENSOR_RANK = 8  # YNNPACK's ynn.h

_rejected: set = set()  # option sets this jaxlib refused (warned about once)

_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_RESULT_SHAPE = re.compile(r'=\s*(\(|[a-z]\w*\[([\d,]*)\](?:\{([^}]*)\})?)')


def compile_options(config, platform: Optional[str] = None) -> dict:
  """The options for a program of this config on ``platform`` (default: JAX's backend)."""
  platform = platform or jax.default_backend()
  if platform == 'cpu' and config.get('cpu_xla_tuned', True):
    return dict(CPU_TUNED)
  return {}


def ynn_fusion_bodies(hlo_text: str) -> Dict[str, List[str]]:
  """The instruction lines of the computations that an optimised HLO module's
  YNNPACK fusions call, by computation name."""
  bodies, body, ynn = {}, None, set()
  for line in hlo_text.splitlines():
    if not line[:1].isspace():  # a computation's header or its closing brace
      if line.endswith('{'):
        words = line.split(' ', 2)
        name = words[1] if words[0] == 'ENTRY' and len(words) > 1 else words[0]
        body = bodies.setdefault(name.lstrip('%'), [])
      else:
        body = None
      continue
    if body is None:
      continue
    body.append(line)
    if '"__ynn_fusion"' in line:
      called = _CALLS.search(line)
      if called:
        ynn.add(called.group(1))
  return {name: bodies.get(name, []) for name in sorted(ynn)}


def ynn_layout_problems(hlo_text: str) -> List[str]:
  """Instructions of an optimised HLO module's YNNPACK fusions that YNNPACK
  cannot take: a tuple, more than ``YNN_MAX_TENSOR_RANK`` dimensions, or a
  layout other than the descending (row-major) one. XLA checks this only when
  it builds the fusion, at the program's first run."""
  problems = []
  for body in ynn_fusion_bodies(hlo_text).values():
    for line in body:
      shape = _RESULT_SHAPE.search(line)
      if not shape:
        continue
      if shape.group(1) == '(':
        problems.append(line.strip())
        continue
      dims = [d for d in shape.group(2).split(',') if d]
      layout = shape.group(3)
      descending = ','.join(str(i) for i in reversed(range(len(dims))))
      if len(dims) > YNN_MAX_TENSOR_RANK or (
          dims and layout is not None and layout.split(':')[0] != descending):
        problems.append(line.strip())
  return problems


def _with_options(lowered, options: dict):
  """``lowered.compile`` with ``options``; None where this jaxlib rejects them."""
  key = tuple(sorted(options.items()))
  if key in _rejected:
    return None
  try:
    return lowered.compile(compiler_options=dict(options))
  except jax.errors.JaxRuntimeError as e:
    if 'option' not in str(e):
      raise
    _rejected.add(key)
    logging.warning('XLA rejected the compile options %s (%s); compiling with XLA\'s '
                    'defaults (config.cpu_xla_tuned=False skips them)', dict(options),
                    str(e).splitlines()[0])
    return None


def compile(lowered, options: Optional[dict] = None):  # pylint: disable=redefined-builtin
  """``lowered.compile()`` with ``options``: XLA's defaults where this jaxlib
  rejects them, the next set of ``FALLBACKS`` where the program compiled with
  them has YNNPACK fusions that would fail at run time."""
  options = dict(options or {})
  while options:
    compiled = _with_options(lowered, options)
    if compiled is None:
      break
    problems = ynn_layout_problems(compiled.as_text())
    if not problems:
      return compiled
    options = FALLBACKS.get(tuple(sorted(options.items())), {})
    logging.info('%d instructions in YNNPACK fusions have layouts it cannot take (first: %s); '
                 'recompiling with %s', len(problems), problems[0], options or "XLA's defaults")
  return lowered.compile()
