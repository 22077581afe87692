"""FID Inception-v3 (the `pt_inception-2015-12-05` network) in Flax linen.

This is the architecture of pytorch-fid's `fid_inception_v3()`: torchvision's
Inception-v3 with the 2015-12-05 TensorFlow graph's quirks patched in, so FID / IS
numbers are comparable with the literature:
  * FIDInceptionA / FIDInceptionC / FIDInceptionE_1: the pool branch averages without
    counting the zero padding (TensorFlow's average pool);
  * FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3 *max* pool;
  * a 1008-way fc head (the TF graph's class count), no auxiliary classifier;
  * BatchNorm epsilon 1e-3, convolutions without bias.

Pixel pipeline (pytorch-fid's): uint8 [0, 255] -> x / 255 -> bilinear resize to
299 x 299 (half-pixel centres, no antialiasing, i.e. `align_corners=False`) -> 2x - 1.

Weights are never downloaded. `load_inception_params` reads either
  * the original pytorch-fid file `pt_inception-2015-12-05-6726825d.pth` (needs
    `torch` importable), verified against its SHA-256; or
  * a `.npz` holding the same state_dict as numpy arrays, one entry per state_dict key
    with the key unchanged and the array in PyTorch layout (conv `weight` OIHW, fc
    `weight` [out, in]); `num_batches_tracked` entries are optional and ignored.
    Convert once on any machine that has torch:
      python -m gdistill.eval.inception pt_inception-2015-12-05-6726825d.pth \
          pt_inception-2015-12-05.npz
    (or: `np.savez(out, **{k: v.numpy() for k, v in torch.load(pth).items()})`).
Both paths map the state_dict to the Flax variables
  {'params': {<Block>: {'conv': {'kernel' HWIO}, 'bn': {'scale', 'bias'}}, ...,
              'fc': {'kernel' [2048, 1008], 'bias' [1008]}},
   'batch_stats': {<Block>: {'bn': {'mean', 'var'}}, ...}}
where <Block> is the torch module path with '.' -> '/' nesting, e.g. state_dict key
`Mixed_6b.branch7x7_2.conv.weight` is params['Mixed_6b']['branch7x7_2']['conv'][
'kernel'], and every array's shape is checked against the model.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "InceptionV3",
    "PT_INCEPTION_FILENAME",
    "PT_INCEPTION_SHA256",
    "PT_INCEPTION_URL",
    "inception_variables_shapes",
    "load_inception_params",
    "inception_features_and_logits",
    "preprocess",
    "state_dict_to_variables",
    "convert_pth_to_npz",
]

PT_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                    "fid_weights/" + PT_INCEPTION_FILENAME)
# SHA-256 of PT_INCEPTION_FILENAME (95,628,359 bytes). torch.hub names files by the
# first 8 hex digits of this hash, hence the "6726825d" suffix; the full digest is the
# one torch-fidelity pins for its identical copy of the file.
PT_INCEPTION_SHA256 = (
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2")

INCEPTION_RESOLUTION = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008

Padding = Any


def _pad(p: int | tuple[int, int]) -> Padding:
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU, as torchvision's."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x):  # [B, H, W, C_in] -> [B, H', W', features]
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=_pad(self.padding), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same_exclude_pad(x):
  # F.avg_pool2d(k=3, s=1, p=1, count_include_pad=False): TF's average pool.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class FIDInceptionA(nn.Module):
  """Mixed_5{b,c,d}: out channels 64 + 64 + 96 + pool_features."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(
        _avg_pool_same_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (grid reduction 35 -> 17): out 384 + 96 + C_in."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6{b,c,d,e}: factorised 7x7 convolutions; out 4 x 192 = 768."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (grid reduction 17 -> 8): out 320 + 192 + C_in."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7{b,c}: out 320 + 768 + 768 + 192 = 2048.

  `max_pool_branch=False` is FIDInceptionE_1 (average pool excluding padding),
  `True` is FIDInceptionE_2 (max pool; a quirk of the TF graph that FID inherits).
  """
  max_pool_branch: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.max_pool_branch:
      # F.max_pool2d pads with -inf, as does nn.max_pool.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same_exclude_pad(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images_uint8, *, resize_to: int = INCEPTION_RESOLUTION):
  """pytorch-fid's pixel pipeline: x = 2 * resize_bilinear(u / 255) - 1.

  Args:
    images_uint8: `[B, H, W, C]`, C in {1, 3}, values in [0, 255]. Grayscale is
      replicated to RGB, as PIL's `convert('RGB')` does in pytorch-fid.
    resize_to: output side.

  Returns:
    `[B, resize_to, resize_to, 3]` float32 in [-1, 1]. The resize uses half-pixel
    centres without antialiasing, i.e. torch's `F.interpolate(mode='bilinear',
    align_corners=False)`, also when shrinking.
  """
  if images_uint8.ndim != 4 or images_uint8.shape[-1] not in (1, 3):
    raise ValueError(
        f"images must be [B, H, W, 1 or 3], got shape {images_uint8.shape}")
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], resize_to, resize_to, 3),
                       method="bilinear", antialias=False)
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """FID Inception-v3: uint8 images -> (pool3 features [B, 2048], fc logits [B, 1008]).

  Attributes:
    resize_to: side the input is bilinearly resized to (299 for FID; the network
      accepts >= 75, which tests use to stay fast).
    precision: matmul/conv precision; HIGHEST keeps accelerators from silently using
      bf16/TF32 passes, so features match the float32 reference network.
  """
  resize_to: int = INCEPTION_RESOLUTION
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images_uint8, *, include_fc_bias: bool = True):
    """Runs the network.

    Args:
      images_uint8: `[B, H, W, C]` with C in {1, 3}, values in [0, 255] (uint8 or
        any dtype holding those values); see `preprocess`.
      include_fc_bias: logits = pool @ W + b if True, pool @ W if False (the
        latter is what the standard Inception Score code uses).

    Returns:
      (pool `[B, 2048]` float32, logits `[B, 1008]` float32).
    """
    x = preprocess(images_uint8, resize_to=self.resize_to)  # [B, 299, 299, 3]
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
    x = conv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # [B, 73, 73, 64]
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)  # [B, 73, 73, 80]
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # [B, 35, 35, 192]
    p = self.precision
    x = FIDInceptionA(32, precision=p, name="Mixed_5b")(x)  # [B, 35, 35, 256]
    x = FIDInceptionA(64, precision=p, name="Mixed_5c")(x)  # [B, 35, 35, 288]
    x = FIDInceptionA(64, precision=p, name="Mixed_5d")(x)  # [B, 35, 35, 288]
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # [B, 17, 17, 768]
    x = FIDInceptionC(128, precision=p, name="Mixed_6b")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6c")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6d")(x)
    x = FIDInceptionC(192, precision=p, name="Mixed_6e")(x)  # [B, 17, 17, 768]
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
    x = FIDInceptionE(False, precision=p, name="Mixed_7b")(x)  # [B, 8, 8, 2048]
    x = FIDInceptionE(True, precision=p, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    fc = nn.Dense(NUM_LOGITS, precision=p, name="fc")
    logits = fc(pool)  # [B, 1008]
    if not include_fc_bias:
      logits = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
    return pool, logits


def inception_variables_shapes(resize_to: int = INCEPTION_RESOLUTION):
  """Shape/dtype tree of InceptionV3's variables, built without any FLOPs."""
  model = InceptionV3(resize_to=resize_to)
  dummy = jax.ShapeDtypeStruct((1, resize_to, resize_to, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)


# Flax leaf name -> torch state_dict suffix, and whether it lives in batch_stats.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  return ".".join(path[:-1] + (_LEAF_TO_TORCH[(collection, path[-1])],))


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if path[-1] == "kernel" and array.ndim == 2:
    return array.T  # Linear [out, in] -> Dense [in, out]
  return array


def state_dict_to_variables(state_dict: dict[str, np.ndarray]) -> dict:
  """Maps a pytorch-fid state_dict (numpy arrays, torch layouts) to Flax variables.

  Every model variable must be present with the exact shape; unknown keys other than
  `*.num_batches_tracked` are errors, so a wrong file cannot half-load.
  """
  shapes = inception_variables_shapes()
  used = set()
  variables = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(shapes[collection])
    out = {}
    for path, leaf in flat.items():
      key = _torch_key(collection, path)
      if key not in state_dict:
        raise KeyError(f"inception weights lack entry '{key}'")
      array = _to_flax_layout(path, np.asarray(state_dict[key], np.float32))
      if array.shape != tuple(leaf.shape):
        raise ValueError(
            f"inception weight '{key}' has shape {array.shape} after layout "
            f"conversion, expected {tuple(leaf.shape)}")
      out[path] = jnp.asarray(array)
      used.add(key)
    variables[collection] = traverse_util.unflatten_dict(out)
  unknown = sorted(k for k in state_dict
                   if k not in used and not k.endswith("num_batches_tracked"))
  if unknown:
    raise KeyError(f"unexpected inception weight entries: {unknown[:5]}"
                   f"{' ...' if len(unknown) > 5 else ''}")
  return variables


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs torch; convert it once elsewhere with "
        f"`python -m gdistill.eval.inception {path} <out>.npz` and pass the .npz"
    ) from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def load_inception_params(path: str | os.PathLike, *,
                          expected_sha256: str | None = None) -> dict:
  """Loads FID Inception weights into Flax variables; never downloads.

  Args:
    path: a `.pth` (pytorch-fid's original file; needs torch) or a `.npz` of the same
      state_dict (keys unchanged, PyTorch layouts; see the module docstring).
    expected_sha256: hex digest the file must have. Default: PT_INCEPTION_SHA256 for
      `.pth` files; no byte-level check for `.npz` (np.savez output embeds
      timestamps, so only its content is checked: every key and shape).

  Returns:
    Variables `{'params': ..., 'batch_stats': ...}` for `InceptionV3`.

  Raises:
    FileNotFoundError: the file does not exist (message says where to get it).
    ValueError: checksum mismatch, unknown extension or wrong shapes.
    KeyError: missing or unexpected state_dict entries.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception weights not found at '{path}': download {PT_INCEPTION_URL} "
        f"(sha256 {PT_INCEPTION_SHA256[:8]}...) and pass that .pth (needs torch), "
        f"or convert it on a machine with torch via `python -m "
        f"gdistill.eval.inception {PT_INCEPTION_FILENAME} pt_inception.npz` and "
        f"pass the .npz")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".pth", ".pt", ".npz"):
    raise ValueError(f"inception weights must be .pth or .npz, got '{path}'")
  if expected_sha256 is None and ext != ".npz":
    expected_sha256 = PT_INCEPTION_SHA256
  if expected_sha256 is not None:
    actual = _sha256(path)
    if actual != expected_sha256.lower():
      raise ValueError(
          f"sha256 of '{path}' is {actual}, expected {expected_sha256.lower()}; "
          f"the file is corrupt or not {PT_INCEPTION_FILENAME}")
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as data:
      state_dict = {k: data[k] for k in data.files}
  else:
    state_dict = _read_torch_state_dict(path)
  return state_dict_to_variables(state_dict)


@functools.lru_cache(maxsize=None)
def _compiled_apply(resize_to: int, include_fc_bias: bool):
  model = InceptionV3(resize_to=resize_to)
  return jax.jit(functools.partial(model.apply, include_fc_bias=include_fc_bias))


def inception_features_and_logits(
    variables: dict, images_uint8, *, batch_size: int = 100,
    include_fc_bias: bool = False, resize_to: int = INCEPTION_RESOLUTION,
) -> tuple[np.ndarray, np.ndarray]:
  """Pool3 features and 1008-way logits of uint8 images, in fixed-size batches.

  The last batch is zero-padded to `batch_size` so one compiled program serves any
  number of images.

  Args:
    variables: from `load_inception_params`.
    images_uint8: `[n, H, W, C]` uint8, C in {1, 3}.
    batch_size: images per jitted call.
    include_fc_bias: False (default) gives pool @ W, the "unbiased" logits that the
      reference Inception Score code (Salimans et al. 2016; torch-fidelity's
      `logits_unbiased`) feeds to the softmax; True gives pool @ W + b.
    resize_to: network input side; 299 for any reported number.

  Returns:
    (pool `[n, 2048]`, logits `[n, 1008]`) float32 numpy arrays.
  """
  images = np.asarray(images_uint8)
  if images.ndim != 4:
    raise ValueError(f"images must be [n, H, W, C], got shape {images.shape}")
  apply = _compiled_apply(resize_to, include_fc_bias)
  n = images.shape[0]
  pools, logits = [], []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    m = chunk.shape[0]
    if m < batch_size:
      pad = np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad], axis=0)
    p, z = apply(variables, jnp.asarray(chunk))
    pools.append(np.asarray(p)[:m])
    logits.append(np.asarray(z)[:m])
  if not pools:
    return (np.zeros((0, POOL_FEATURES), np.float32),
            np.zeros((0, NUM_LOGITS), np.float32))
  return np.concatenate(pools), np.concatenate(logits)


def convert_pth_to_npz(pth_path: str, npz_path: str) -> None:
  """Writes pytorch-fid's .pth state_dict as the .npz `load_inception_params` reads.

  Verifies the .pth checksum and that the state_dict maps onto the model before
  writing. Needs torch.
  """
  if _sha256(pth_path) != PT_INCEPTION_SHA256:
    raise ValueError(f"'{pth_path}' is not {PT_INCEPTION_FILENAME} (sha256 differs)")
  state_dict = _read_torch_state_dict(pth_path)
  state_dict_to_variables(state_dict)
  np.savez(npz_path, **state_dict)


def main(argv: Sequence[str]) -> int:
  if len(argv) != 3:
    print(f"usage: python -m gdistill.eval.inception {PT_INCEPTION_FILENAME} "
          f"out.npz", file=sys.stderr)
    return 2
  convert_pth_to_npz(argv[1], argv[2])
  print(f"wrote {argv[2]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
