"""A teacher brought from the user's own code: ``teacher.source='python:pkg.module:factory'``.

The factory is a function of the config that returns a ``ForeignTeacher``: the network as
a ``gdistill.denoiser.Denoiser`` (its apply function and conventions), its variables
(loaded however the user's code loads them: Orbax, Flax msgpack, safetensors; gdistill
never unpickles), the image shape and classes it was trained on, and how its student
gets the guidance weight w:

  * ``w_hook='t_embedder'`` (the default way): the path of its time-embedding submodule;
    a zero-initialised Fourier(w) MLP is added to that submodule's output
    (``gdistill.w_hook``), so the fresh student equals the conditional teacher;
  * ``student``: a Denoiser that takes ``w=`` itself, with ``student_init(rng,
    teacher_params) -> params`` (a network declared with a w input).

``load`` imports and calls the factory and checks what it returns on a small batch, with
one-line errors a user can act on.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gdistill import w_hook
from gdistill.config_validation import ConfigError
from gdistill.denoiser import OUTPUTS, Denoiser, OutputShapeError

PREFIX = 'python:'


class TeacherSourceError(ConfigError):
  """A ``teacher.source`` that cannot be used (one line, exit 2, nothing written)."""

# alpha at the last time of a path: above this, a 1-step student starts from an input
# that still holds visible signal it never sees when sampling from pure noise.
MAX_TERMINAL_ALPHA = 0.05


@dataclasses.dataclass
class ForeignTeacher:
  """What a ``teacher.source`` factory returns."""
  net: Denoiser
  params: Any
  image_shape: tuple  # (H, W, C) of gdistill's NHWC arrays
  num_classes: int  # the dataset labels 0..K-1 (the net maps them with ``label_to_cond``)
  w_hook: str = ''
  w_features: int = 64
  w_embed_scale: float = 250.0
  student: Optional[Denoiser] = None
  student_init: Optional[Callable] = None
  description: dict = dataclasses.field(default_factory=dict)
  # A latent teacher's autoencoder (``gdistill.codec.FunctionCodec``, or an
  # ``AutoencoderCodec`` from ``gdistill.codec.load``): ``image_shape`` is then its latents'.
  codec: Any = None

  def student_net(self) -> Denoiser:
    """The stage-1 / stage-2 student: declared, or the teacher with the w hook."""
    if self.student is not None:
      return self.student
    return dataclasses.replace(
        self.net, takes_w=True,
        apply_fn=w_hook.hook_linen(self.net.apply_fn, self.w_hook, features=self.w_features,
                                   w_embed_scale=self.w_embed_scale))

  def embedding_dim(self) -> int:
    """Width of the hooked submodule's output (the w embedding's)."""
    z = jnp.zeros((2, *self.image_shape), jnp.float32)
    t = jnp.full((2,), 0.5, jnp.float32)
    label = jnp.zeros((2,), jnp.int32)
    return w_hook.embedding_shape(
        lambda p: self.net.x_hat(p, z, t=t, logsnr=self.net.path.logsnr(t), cond=label),
        self.params, self.w_hook)[-1]

  def init_student(self, rng, teacher_params):
    """Stage 1's first student: the teacher's variables (plus a fresh w embedding)."""
    if self.student is not None:
      return self.student_init(rng, teacher_params)
    return w_hook.student_params(teacher_params, w_hook.init_w_params(
        self.embedding_dim(), rng, features=self.w_features, w_embed_scale=self.w_embed_scale))

  def meta(self, source: str) -> dict:
    """The checkpoint meta's ``model`` entry of its phases: what the network is."""
    return {'source': source, **self.net.describe(), 'w_hook': self.w_hook,
            'w_features': self.w_features, 'w_embed_scale': self.w_embed_scale,
            **({'description': self.description} if self.description else {})}


def is_python_source(source: str) -> bool:
  return bool(source) and source.startswith(PREFIX)


def _import_factory(source: str) -> Callable:
  spec = source[len(PREFIX):]
  module_name, _, attr = spec.partition(':')
  if not module_name or not attr:
    raise TeacherSourceError(f'teacher.source={source!r}: expected python:package.module:factory')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise TeacherSourceError(f'teacher.source={source!r}: cannot import {module_name} ({e}); expected '
                     f'a module importable from the working directory or PYTHONPATH') from e
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise TeacherSourceError(f'teacher.source={source!r}: {module_name} has no function {attr!r}')
  return factory


def load(source: str, config, *, image_shape=None, num_classes=None) -> ForeignTeacher:
  """Imports and calls the factory, then checks its teacher on two examples."""
  teacher = _import_factory(source)(config)
  if not isinstance(teacher, ForeignTeacher):
    raise TeacherSourceError(f'teacher.source={source!r}: the factory returned '
                     f'{type(teacher).__name__}, expected gdistill.teacher_source.ForeignTeacher')
  net = teacher.net
  if net.output not in OUTPUTS:
    raise TeacherSourceError(f'teacher.source={source!r}: output={net.output!r}, expected one of '
                     f'{OUTPUTS}')
  if image_shape is not None and tuple(image_shape) != tuple(teacher.image_shape):
    raise TeacherSourceError(f'teacher.source={source!r}: the teacher takes images of shape '
                     f'{tuple(teacher.image_shape)}, the data are {tuple(image_shape)}')
  if num_classes is not None and int(num_classes) != int(teacher.num_classes):
    raise TeacherSourceError(f'teacher.source={source!r}: the teacher has {teacher.num_classes} classes, '
                     f'the data {num_classes}')
  if teacher.student is None and not teacher.w_hook:
    raise TeacherSourceError(f'teacher.source={source!r}: the teacher declares neither w_hook (its '
                     f'time-embedding submodule) nor a student that takes w')
  _check_calls(source, teacher)
  _check_terminal(source, net.path, config)
  return teacher


def _check_calls(source: str, teacher: ForeignTeacher) -> None:
  net, shape = teacher.net, tuple(teacher.image_shape)
  z = jnp.zeros((2, *shape), jnp.float32)
  t = jnp.asarray([0.5, 0.9], jnp.float32)
  lam = net.path.logsnr(t)
  label = jnp.asarray([0, teacher.num_classes - 1], jnp.int32)
  try:
    jax.eval_shape(lambda p: net.x_hat(p, z, t=t, logsnr=lam, cond=label), teacher.params)
  except OutputShapeError as e:
    raise TeacherSourceError(f'teacher.source={source!r}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherSourceError(f'teacher.source={source!r}: the network fails on a batch of 2 '
                             f'images of shape {shape} ({type(e).__name__}: {str(e)[:200]})') from e
  try:
    jax.eval_shape(lambda p: net.guided_x_hat(p, z, t=t, logsnr=lam, cond=label,
                                              w=jnp.ones((2,))), teacher.params)
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherSourceError(f'teacher.source={source!r}: the network rejects its null condition '
                     f'{np.asarray(net.null_cond).tolist()!r} ({type(e).__name__}: '
                     f'{str(e)[:200]})') from e
  if teacher.student is None:
    try:
      teacher.embedding_dim()
    except ValueError as e:
      raise TeacherSourceError(f'teacher.source={source!r}: {e}') from e


def _check_terminal(source: str, path, config) -> None:
  terminal = getattr(path, 'terminal_alpha', None)
  if terminal is None:
    return
  alpha = terminal()
  if alpha > MAX_TERMINAL_ALPHA and not config.teacher.get('allow_signal_at_t1', False):
    raise TeacherSourceError(
        f'teacher.source={source!r}: its noise path ends at alpha(1) = {alpha:.3f}, far from '
        f'pure noise: samplers start from N(0, I), which its network never saw, and a 1- or '
        f'2-step student cannot remove what it never learnt. Use a v-prediction teacher '
        f'fine-tuned for zero terminal SNR, or set --config.teacher.allow_signal_at_t1=True '
        f'to distil it anyway (expect poor 1-step samples)')

