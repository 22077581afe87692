"""Image files the command-line tools read and write (.png grids, .npz arrays).

Images in memory are float32 [n, H, W, C] in [-1, 1]. On disk:
  * .npz: uint8 [n, H, W, C] (the FID protocol's quantisation) under ``image``,
    with labels and the settings that made them.
  * .png: a grid as ``grids.save_grid`` writes it (2-pixel white padding,
    upscaled 2x). Reading also accepts one image, or images tiled without gaps.
"""

from __future__ import annotations

import io
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image

from gdistill import storage
from gdistill.grids import save_grid, to_uint8

EXTENSIONS = ('.png', '.npz')
_PAD = 2  # grids.grid_image's default padding
_MAX_COLS = 16


def check_output_path(path: str, *, fail: Callable[[str], None]) -> None:
  """One-line error (via ``fail``) unless ``path`` ends in .png or .npz."""
  if os.path.splitext(path)[1].lower() not in EXTENSIONS:
    fail(f'--output={path}: expected a file name ending in .png or .npz')


def _from_uint8(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def _fit_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """[n, H, W, c] -> [n, H, W, channels]: grey <-> RGB by repeating / averaging."""
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 1:
    return np.repeat(images, channels, axis=-1)
  if channels == 1 and c in (3, 4):
    return images[..., :3].mean(axis=-1, keepdims=True)
  raise ValueError(f'images with {c} channels cannot be used as {channels}-channel images')


def _read_npz(path: str, image_shape, flag: str) -> np.ndarray:
  with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
    keys = [k for k in ('image', 'images') if k in data.files]
    if not keys and len(data.files) == 1:
      keys = data.files
    if not keys:
      raise ValueError(f'{flag}={path}: expected an array named "image" or "images" '
                       f'(it holds {sorted(data.files)})')
    x = np.asarray(data[keys[0]])
  if x.ndim == 2:  # one grey [H, W]
    x = x[None, ..., None]
  elif x.ndim == 3:  # one [H, W, C], or grey [n, H, W]
    x = x[None] if x.shape == tuple(image_shape) else x[..., None]
  if x.ndim != 4 or x.shape[1:3] != tuple(image_shape[:2]):
    raise ValueError(f'{flag}={path}: images of shape {x.shape}, expected [n, '
                     f'{image_shape[0]}, {image_shape[1]}, {image_shape[2]}]')
  if x.dtype == np.uint8:
    x = _from_uint8(x)
  elif np.issubdtype(x.dtype, np.floating):
    if not np.isfinite(x).all():
      bad = int(np.size(x) - np.isfinite(x).sum())
      raise ValueError(f'{flag}={path}: {bad} image values are NaN or infinite, expected '
                       f'finite values in [-1, 1] (or store uint8)')
    if x.size and (x.min() < -1.01 or x.max() > 1.01):
      raise ValueError(f'{flag}={path}: float images range over [{x.min():.3g}, {x.max():.3g}],'
                       f' expected [-1, 1] (or store uint8)')
    x = np.clip(x.astype(np.float32), -1.0, 1.0)
  else:
    raise ValueError(f'{flag}={path}: images of dtype {x.dtype}, expected uint8 or float')
  return _fit_channels(x, image_shape[2])


def _grid_tiles(pixels: np.ndarray, h: int, w: int) -> Optional[list[np.ndarray]]:
  """Tiles of a ``grids.save_grid`` picture at any integer scale, or None."""
  height, width = pixels.shape[:2]
  for scale in (2, 1, 3, 4):
    if height % scale or width % scale:
      continue
    img = pixels[::scale, ::scale]
    rows, rem_r = divmod(img.shape[0] - _PAD, h + _PAD)
    cols, rem_c = divmod(img.shape[1] - _PAD, w + _PAD)
    if rem_r or rem_c or rows < 1 or cols < 1:
      continue
    mask = np.ones(img.shape[:2], bool)  # padding pixels
    tiles = []
    for r in range(rows):
      for c in range(cols):
        y, x = _PAD + r * (h + _PAD), _PAD + c * (w + _PAD)
        mask[y:y + h, x:x + w] = False
        tiles.append(img[y:y + h, x:x + w])
    if (img[mask] == 255).all():
      return tiles
  return None


def _read_png(path: str, image_shape, flag: str) -> np.ndarray:
  h, w, c = image_shape
  with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
    pixels = np.asarray(im.convert('L' if c == 1 else 'RGB'))
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  tiles = _grid_tiles(pixels, h, w)
  if tiles is not None:
    # A grid's all-white tiles are the blanks that fill its last row.
    tiles = [t for t in tiles if not (t == 255).all()]
  elif pixels.shape[0] % h == 0 and pixels.shape[1] % w == 0:
    tiles = [pixels[y:y + h, x:x + w] for y in range(0, pixels.shape[0], h)
             for x in range(0, pixels.shape[1], w)]
  else:
    raise ValueError(f'{flag}={path}: a {pixels.shape[1]}x{pixels.shape[0]} PNG is neither '
                     f'{w}x{h} images tiled without gaps nor a gdistill grid of them')
  if not tiles:
    raise ValueError(f'{flag}={path}: the grid holds only blank tiles')
  return _from_uint8(np.stack(tiles))


def read_images(path: str, image_shape, *, flag: str = '--input') -> np.ndarray:
  """[n, H, W, C] float32 in [-1, 1] from a .npz or .png; ValueError with one line otherwise."""
  if not storage.isfile(path):
    raise ValueError(f'{flag}={path}: no such file')
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext == '.npz':
      return _read_npz(path, tuple(image_shape), flag)
    if ext == '.png':
      return _read_png(path, tuple(image_shape), flag)
  except (OSError, ValueError) as e:
    if str(e).startswith(flag):
      raise
    raise ValueError(f'{flag}={path}: unreadable ({e})') from e
  raise ValueError(f'{flag}={path}: expected a .png or .npz file')


def _blank_padded(images: np.ndarray, cols: int) -> np.ndarray:
  """[n, H, W, C] -> [ceil(n / cols), cols, H, W, C], the last row filled with white."""
  n = images.shape[0]
  rows = -(-n // cols)
  blank = np.ones((rows * cols - n, *images.shape[1:]), images.dtype)
  return np.concatenate([images, blank]).reshape(rows, cols, *images.shape[1:])


def _save_npz(path: str, **arrays) -> None:
  storage.write_with(path, lambda f: np.savez(f, **arrays))


def write_samples(path: str, images: np.ndarray, labels: np.ndarray, *, meta: dict,
                  rows: Optional[int] = None) -> None:
  """Samples [n, H, W, C] in [-1, 1]: a .png grid (``rows`` rows, else up to 16 per row)
  or a .npz with ``image`` uint8, ``label`` and the ``meta`` values."""
  if path.lower().endswith('.npz'):
    _save_npz(path, image=to_uint8(images), label=np.asarray(labels, np.int32),
              **{k: np.asarray(v) for k, v in meta.items()})
    return
  n = images.shape[0]
  cols = n // rows if rows and n % rows == 0 else min(n, _MAX_COLS)
  save_grid(_blank_padded(images, cols), path)


def write_pairs(path: str, x: np.ndarray, y: np.ndarray, *, meta: dict) -> None:
  """Inputs and their translations: a .png whose rows alternate input / translated
  (up to 16 per row), or a .npz with ``input`` and ``image`` (uint8) and ``meta``."""
  if path.lower().endswith('.npz'):
    _save_npz(path, input=to_uint8(x), image=to_uint8(y),
              **{k: np.asarray(v) for k, v in meta.items()})
    return
  cols = min(x.shape[0], _MAX_COLS)
  gx, gy = _blank_padded(x, cols), _blank_padded(y, cols)
  save_grid(np.stack([gx, gy], axis=1).reshape(-1, *gx.shape[1:]), path)
