"""Image grids as PNG files."""

from __future__ import annotations

import numpy as np
from PIL import Image

from gdistill import storage


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8 as the FID protocol quantises: round((x + 1) * 127.5)."""
  return np.round((np.clip(np.asarray(x, np.float32), -1, 1) + 1.0) * 127.5).astype(np.uint8)


def grid_image(images, *, pad: int = 2) -> np.ndarray:
  """[rows, cols, H, W, C] in [-1, 1] -> one uint8 image with a padding border."""
  images = to_uint8(images)
  rows, cols, h, w, c = images.shape
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for r in range(rows):
    for k in range(cols):
      y, x = pad + r * (h + pad), pad + k * (w + pad)
      out[y:y + h, x:x + w] = images[r, k]
  return out


def save_grid(images, path: str, *, scale: int = 2) -> str:
  """Saves a [rows, cols, H, W, C] grid (upscaled ``scale`` x, nearest) as PNG."""
  img = grid_image(images)
  if img.shape[-1] == 1:
    img = img[..., 0]
  pil = Image.fromarray(img)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  storage.write_with(path, lambda f: pil.save(f, format='PNG'))
  return path
