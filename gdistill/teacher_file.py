"""One phase's sampling parameters as a single file, e.g. a converged teacher to ship.

  weights/fashion_mnist_teacher.msgpack   the parameter tree, float32 (or float16 to halve
                                          the file: ``export --dtype=float16``; read back
                                          as float32) (``flax.serialization.msgpack_serialize``)
  weights/fashion_mnist_teacher.json      its sidecar: what the network is, where the
                                          weights came from, their sha256 and byte size

Nothing is pickled. Both files are written atomically (a temporary file, then
``os.replace``), the weights first: a crash between the two leaves a sidecar whose
size/sha256 no longer match, which ``load_params`` reports. Every failure of
``load_params`` is a ``gdistill.checkpoint.CheckpointError`` with one line that names the
file and what was expected, so the command-line entry points print it as
``gdistill: error: ...``.

The sidecar (``info``) holds at least what ``network_info`` returns (the model section as
``networks.model_kwargs(config)``, use_w, mean_type, num_classes, image_shape, dataset),
plus whatever the caller adds (phase, step, images seen, FID, the config), plus
``format`` and ``weights`` ({'file', 'bytes', 'sha256', 'num_params', 'dtype'}).

This module also reads the sampling parameters of *any* saved step of a phase directory
(``phase_steps``, ``step_times``, ``load_step_params``); ``checkpoint.load_eval_params``
reads only the latest.

Command line:

  python -m gdistill.teacher_file export --workdir=DIR --phase=teacher \\
      --output=weights/fashion_mnist_teacher.msgpack [--step=N] [--dtype=float16] [--fid=3.1] \\
      [--info k=v ...]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from gdistill import checkpoint, networks, run_plan, storage
from gdistill.checkpoint import CheckpointError

FORMAT = 'gdistill-sampling-params/1'
SUFFIX = '.msgpack'  # the weights file; its sidecar is the same name with .json
# The sidecar entries that decide whether parameters fit a network (load_params' expect).
NETWORK_KEYS = ('model', 'use_w', 'mean_type', 'num_classes', 'image_shape')
_RESERVED = ('format', 'weights')


# ---- what the network is -----------------------------------------------------------


def network_info(config, *, use_w: bool, num_classes: int, image_shape) -> dict:
  """What a parameter tree is for: the sidecar entries every file carries."""
  return {'model': networks.model_kwargs(config, use_w=use_w), 'use_w': bool(use_w),
          'mean_type': config.diffusion.mean_type, 'num_classes': int(num_classes),
          'image_shape': [int(s) for s in image_shape], 'dataset': config.data.name}


def expected(config, *, use_w: bool, num_classes: int, image_shape) -> dict:
  """``load_params``' ``expect`` for the network this config builds."""
  info = network_info(config, use_w=use_w, num_classes=num_classes, image_shape=image_shape)
  return {k: info[k] for k in NETWORK_KEYS}


def sidecar_path(path: str) -> str:
  """``weights/x.msgpack`` -> ``weights/x.json``."""
  return os.path.splitext(os.fspath(path))[0] + '.json'


# ---- writing ------------------------------------------------------------------------


STORAGE_DTYPES = ('float32', 'float16')


def _host_float(x, dtype: str) -> np.ndarray:
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  a = np.asarray(jax.device_get(x))
  return a.astype(dtype) if jax.dtypes.issubdtype(a.dtype, np.floating) else a


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if hasattr(x, 'to_dict'):  # ml_collections.ConfigDict
    return x.to_dict()
  raise TypeError(f'info: {type(x).__name__} is not JSON serialisable')


def _write_atomic(path: str, data: bytes) -> None:
  if storage.is_remote(path):  # one upload is atomic
    storage.write_bytes(path, data)
    return
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_params(path: str, params, info: dict, *, dtype: str = 'float32') -> dict:
  """Writes ``params`` (as numpy ``dtype``) to ``path`` and ``info`` to its JSON sidecar.

  Args:
    path: the weights file, conventionally ``*.msgpack``; the sidecar is
      ``sidecar_path(path)``.
    params: the parameter tree (nested dicts of arrays; sharded jax arrays are gathered).
    info: JSON-serialisable description (``network_info(...)`` plus anything else);
      the keys ``format`` and ``weights`` are set here.
    dtype: how floating-point leaves are stored: 'float32' or 'float16' (half the bytes;
      ``load_params`` casts back to the network's dtype).
  Returns:
    The sidecar as written.
  """
  path = os.fspath(path)
  side = sidecar_path(path)
  if side == path:
    raise ValueError(f'{path}: the weights file must not end in .json (its sidecar does)')
  clash = [k for k in _RESERVED if k in info]
  if clash:
    raise ValueError(f'info: keys {clash} are set by save_params')
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f'dtype={dtype!r}: expected one of {STORAGE_DTYPES}')
  tree = jax.tree.map(functools.partial(_host_float, dtype=dtype), params)
  data = serialization.msgpack_serialize(tree)
  leaves = jax.tree.leaves(tree)
  full = dict(info, format=FORMAT, weights={
      'file': os.path.basename(path), 'bytes': len(data),
      'sha256': hashlib.sha256(data).hexdigest(),
      'num_params': int(sum(a.size for a in leaves)), 'dtype': dtype})
  text = json.dumps(full, indent=2, sort_keys=True, default=_json_default) + '\n'
  storage.makedirs(os.path.dirname(storage.absolute(path)))
  _write_atomic(path, data)
  _write_atomic(side, text.encode())
  return json.loads(text)


# ---- reading ------------------------------------------------------------------------


def _norm(x):
  """JSON-normalised value (tuples -> lists), as the files hold them."""
  return json.loads(json.dumps(x, default=_json_default))


def _differences(key: str, have, want, out: list) -> list:
  """Dotted keys whose values differ, descending into dicts (at most a few)."""
  if isinstance(have, dict) and isinstance(want, dict):
    for k in sorted(set(have) | set(want)):
      _differences(f'{key}.{k}', have.get(k), want.get(k), out)
  elif have != want:
    out.append((key, have, want))
  return out


def _show(x) -> str:
  return json.dumps(x, sort_keys=True) if x is not None else 'absent'


def _fail(message: str) -> CheckpointError:
  return CheckpointError(' '.join(str(message).split()))  # one line, whatever e said


def read_info(path: str) -> dict:
  """The sidecar of ``path`` (CheckpointError if either file is missing or it is unreadable)."""
  path = os.fspath(path)
  side = sidecar_path(path)
  if not storage.isfile(path):
    raise _fail(f'{path}: no such file (expected sampling parameters written by '
                f'gdistill.teacher_file, with the sidecar {os.path.basename(side)})')
  if not storage.isfile(side):
    raise _fail(f'{side}: no such file (expected the JSON sidecar of {path})')
  try:
    info = json.loads(storage.read_text(side))
  except (OSError, ValueError) as e:
    raise _fail(f'{side}: unreadable ({e}); expected the JSON sidecar of {path}') from e
  weights = info.get('weights') if isinstance(info, dict) else None
  if not isinstance(weights, dict) or info.get('format') != FORMAT or \
      not isinstance(weights.get('bytes'), int) or not isinstance(weights.get('sha256'), str):
    raise _fail(f'{side}: not a sidecar of format {FORMAT} (expected "format" and "weights" '
                f'with "bytes" and "sha256")')
  return info


def _read_verified(path: str, info: dict) -> bytes:
  want = info['weights']
  data = storage.read_bytes(path)
  if len(data) != want['bytes']:
    raise _fail(f'{path}: truncated or corrupted: {len(data)} bytes, expected {want["bytes"]} '
                f'(from {os.path.basename(sidecar_path(path))})')
  digest = hashlib.sha256(data).hexdigest()
  if digest != want['sha256']:
    raise _fail(f'{path}: truncated or corrupted: sha256 {digest[:16]}..., expected '
                f'{want["sha256"][:16]}... (from {os.path.basename(sidecar_path(path))})')
  return data


def _check_expect(path: str, info: dict, expect: dict) -> None:
  for key, want in (expect or {}).items():
    have, want = _norm(info.get(key)), _norm(want)
    if have != want:
      diffs = _differences(key, have, want, [])
      shown = ', '.join(f'{k}={_show(h)} (expected {_show(w)})' for k, h, w in diffs[:3])
      more = f' and {len(diffs) - 3} more' if len(diffs) > 3 else ''
      raise _fail(f'{path}: the file is for another network: {shown}{more}')


def _path_key(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _fit(path: str, flat: dict, abstract_params):
  """The restored flat tree arranged as ``abstract_params`` (checked, cast, placed)."""
  abstract_flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  want = {_path_key(p): a for p, a in abstract_flat}
  missing = [k for k in want if k not in flat]
  extra = [k for k in flat if k not in want]
  shapes = [(k, tuple(flat[k].shape), tuple(a.shape)) for k, a in want.items()
            if k in flat and tuple(np.shape(flat[k])) != tuple(a.shape)]
  if missing or extra or shapes:
    parts = []
    if missing:
      parts.append(f'missing {["/".join(k) for k in missing[:3]]}'
                   + (f' (+{len(missing) - 3})' if len(missing) > 3 else ''))
    if extra:
      parts.append(f'unexpected {["/".join(k) for k in extra[:3]]}'
                   + (f' (+{len(extra) - 3})' if len(extra) > 3 else ''))
    for k, h, w in shapes[:3]:
      parts.append(f'{"/".join(k)} has shape {h}, expected {w}')
    raise _fail(f'{path}: parameters do not fit the network: {"; ".join(parts)}')

  def place(key, a):
    x = np.asarray(flat[key])
    if x.dtype != a.dtype:
      x = x.astype(a.dtype)
    sharding = getattr(a, 'sharding', None)
    return jax.device_put(x, sharding) if sharding is not None else jax.device_put(x)
  return jax.tree_util.tree_unflatten(treedef, [place(_path_key(p), a) for p, a in abstract_flat])


def load_params(path: str, *, expect: Optional[dict], abstract_params) -> tuple[Any, dict]:
  """Reads a file written by ``save_params`` and checks it fits the network.

  Args:
    path: the weights file (its sidecar is ``sidecar_path(path)``).
    expect: sidecar entries that must match (``expected(config, ...)``: model kwargs,
      image_shape, num_classes, mean_type, use_w), compared JSON-normalised.
    abstract_params: tree of ``jax.ShapeDtypeStruct`` the parameters must fit; leaves
      with a ``sharding`` are placed with it, the others on the default device. None
      returns the stored tree of numpy arrays unchecked.
  Returns:
    (params, info).
  Raises:
    CheckpointError: one line naming the file and what was expected.
  """
  path = os.fspath(path)
  info = read_info(path)
  data = _read_verified(path, info)
  _check_expect(path, info, expect)
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several kinds)
    raise _fail(f'{path}: not decodable as a msgpack parameter tree '
                f'({type(e).__name__}: {e})') from e
  if not isinstance(tree, dict):
    raise _fail(f'{path}: holds a {type(tree).__name__}, expected a parameter tree (dict)')
  if abstract_params is None:
    return tree, info
  flat = traverse_util.flatten_dict(tree)
  bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise _fail(f'{path}: entry {"/".join(map(str, bad[0]))} is not an array')
  return _fit(path, {tuple(map(str, k)): v for k, v in flat.items()}, abstract_params), info


# ---- any saved step of a phase directory ------------------------------------------------


def phase_steps(directory: str) -> list[int]:
  """Every step saved (and finished) in a phase directory, ascending; [] if none."""
  if not storage.isdir(directory):
    return []
  mgr = checkpoint.manager(directory, create=False)
  try:
    return sorted(int(s) for s in mgr.all_steps())
  finally:
    mgr.close()


def step_times(directory: str, steps) -> dict[int, Optional[float]]:
  """Unix time each step was committed (orbax's step metadata, else the step directory's
  mtime; None where the step is not found)."""
  name_format = ocp.step.standard_name_format()  # the CheckpointManager's default
  out = {}
  for step in steps:
    try:
      out[int(step)] = name_format.find_step(directory, int(step)).commit_timestamp.timestamp()
    except (ValueError, OSError):
      out[int(step)] = None
  return out


def _restore_sharding(a):
  s = getattr(a, 'sharding', None)
  return s if s is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_step_params(directory: str, abstract_params, *, step: Optional[int] = None,
                     expect: Optional[dict] = None) -> tuple[Any, dict]:
  """``checkpoint.load_eval_params`` for any saved ``step`` (None: the latest).

  Returns:
    (params, meta): the EMA parameters if the phase kept them, else the raw ones.
  """
  if step is None:
    return checkpoint.load_eval_params(directory, abstract_params, expect=expect)
  steps = phase_steps(directory)
  if step not in steps:
    raise _fail(f'checkpoint {directory}: no step {step} there (saved steps: '
                f'{steps if len(steps) <= 12 else steps[:6] + ["..."] + steps[-6:]})')
  meta = checkpoint.read_meta(directory, step)
  for key, want in (expect or {}).items():
    if _norm(meta.get(key)) != _norm(want):
      raise _fail(f'checkpoint {directory}: {key}={meta.get(key)} does not match this '
                  f'config\'s {key}={want}')
  which = checkpoint.sampling_key(meta)
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=_restore_sharding(a),
                                                global_shape=a.shape, dtype=a.dtype),
      abstract_params)
  mgr = checkpoint.manager(directory, create=False)
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={which: abstract_params}, restore_args={which: restore_args},
            partial_restore=True)))
  finally:
    mgr.close()
  return restored.state[which], meta


# ---- exporting a phase --------------------------------------------------------------------


def phase_batch_size(config, phase: str) -> Optional[int]:
  """The global batch of a phase's updates (images seen = step * this), if known."""
  parsed = run_plan.parse_phase_name(phase)
  if parsed is None:
    return None
  return int(run_plan.PhaseSpec(phase, *parsed, None, '').section(config).batch_size)


def abstract_params_for(config, *, use_w: bool, num_classes: int, image_shape,
                        sharding=None):
  """``jax.ShapeDtypeStruct`` tree of the network's parameters (one ``sharding`` for all
  leaves, or a function leaf -> sharding, or None)."""
  net = networks.make_net(config, num_classes=num_classes, out_ch=int(image_shape[-1]),
                          use_w=use_w)
  abstract = jax.eval_shape(functools.partial(networks.init_params, net,
                                              image_shape=tuple(image_shape)),
                            jax.random.PRNGKey(0))
  if sharding is None:
    return abstract
  pick = sharding if callable(sharding) else (lambda a: sharding)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=pick(a)),
                      abstract)


def export_phase(checkpoint_dir: str, path: str, *, config, extra_info: Optional[dict] = None,
                 step: Optional[int] = None, dtype: str = 'float32') -> dict:
  """Writes the sampling parameters of a phase's checkpoint (latest, or ``step``) to ``path``.

  The network is built from ``config`` (its model section must match the checkpoint's);
  num_classes, image_shape and use_w come from the checkpoint's meta.

  Returns:
    The sidecar as written: ``network_info`` plus phase, step, images_seen, weights
    ('ema' or 'raw'), source (the phase directory), config, and ``extra_info``.
  """
  checkpoint_dir = storage.absolute(checkpoint_dir)
  if step is None:
    step = checkpoint.latest_complete(checkpoint_dir)
  if step is None:
    raise _fail(f'checkpoint {checkpoint_dir}: no checkpoint found there (expected a phase '
                f'directory such as WORKDIR/checkpoints/teacher)')
  meta = checkpoint.read_meta(checkpoint_dir, step)
  try:
    use_w, num_classes = bool(meta['use_w']), int(meta['num_classes'])
    image_shape = [int(s) for s in meta['image_shape']]
  except (KeyError, TypeError, ValueError) as e:
    raise _fail(f'checkpoint {checkpoint_dir}: its meta lacks use_w/num_classes/image_shape '
                f'({e})') from e
  abstract = abstract_params_for(config, use_w=use_w, num_classes=num_classes,
                                 image_shape=image_shape,
                                 sharding=jax.sharding.SingleDeviceSharding(
                                     jax.local_devices()[0]))
  expect = expected(config, use_w=use_w, num_classes=num_classes, image_shape=image_shape)
  codec = {'codec': meta['codec']} if 'codec' in meta else {}  # a latent run's autoencoder
  expect.update(codec)
  if step == checkpoint.latest_complete(checkpoint_dir):
    params, meta = checkpoint.load_eval_params(checkpoint_dir, abstract, expect=expect)
  else:
    params, meta = load_step_params(checkpoint_dir, abstract, step=step, expect=expect)
  phase = meta.get('phase') or os.path.basename(checkpoint_dir)
  batch = phase_batch_size(config, phase)
  info = network_info(config, use_w=use_w, num_classes=num_classes, image_shape=image_shape)
  info.update(codec)
  info.update(phase=phase, step=int(step),
              images_seen=None if batch is None else int(step) * batch,
              weights_kind='ema' if meta.get('has_ema') else 'raw',
              has_ema=bool(meta.get('has_ema')),
              student_steps=meta.get('student_steps'), source=checkpoint_dir,
              config=config.to_dict())
  info.update(extra_info or {})
  return save_params(path, params, info, dtype=dtype)


# ---- command line -------------------------------------------------------------------------


def _parse_value(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m gdistill.teacher_file',
                              description='Single-file sampling parameters of a phase.')
  sub = p.add_subparsers(dest='command', required=True)
  e = sub.add_parser('export', help='write a phase checkpoint\'s sampling parameters')
  e.add_argument('--workdir', required=True, help='workdir of a gdistill run')
  e.add_argument('--phase', default='teacher', help='phase directory name (default teacher)')
  e.add_argument('--output', required=True, help='weights file, e.g. weights/x.msgpack')
  e.add_argument('--step', type=int, default=None, help='a saved step (default: the latest)')
  e.add_argument('--dtype', choices=STORAGE_DTYPES, default='float32',
                 help='storage of the weights (float16: half the bytes, read back as float32)')
  e.add_argument('--fid', type=_parse_value, default=None,
                 help='FID to record (a number, or JSON such as {"w0": 3.1, "w1": 2.0})')
  e.add_argument('--info', action='append', default=[], metavar='KEY=VALUE',
                 help='another sidecar entry (VALUE parsed as JSON when it is JSON)')
  args = p.parse_args(argv)

  from gdistill import cli_setup  # pylint: disable=g-import-not-at-top
  from gdistill.eval import workdir_config  # pylint: disable=g-import-not-at-top
  from gdistill.workdir import CONFIG_FILE  # pylint: disable=g-import-not-at-top
  if not storage.isfile(os.path.join(args.workdir, CONFIG_FILE)):
    cli_setup.fail(f'--workdir={args.workdir}: no {CONFIG_FILE} there; expected the workdir '
                   f'of a gdistill run')
  extra = {}
  if args.fid is not None:
    extra['fid'] = args.fid
  for item in args.info:
    key, sep, value = item.partition('=')
    if not sep or not key:
      cli_setup.fail(f'--info={item!r}: expected KEY=VALUE')
    if key in _RESERVED:
      cli_setup.fail(f'--info={item!r}: {key} is set by the exporter')
    extra[key] = _parse_value(value)
  config = workdir_config.get_config(storage.absolute(args.workdir))
  with cli_setup.user_errors():
    info = export_phase(checkpoint.phase_dir(args.workdir, args.phase), args.output,
                        config=config, extra_info=extra, step=args.step, dtype=args.dtype)
  w = info['weights']
  print(f'wrote {args.output} ({w["num_params"] / 1e6:.2f}M parameters, {w["bytes"]:,} bytes, '
        f'{info["phase"]} step {info["step"]}, {info["weights_kind"]} weights) and '
        f'{sidecar_path(args.output)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
