"""Guided DDIM sampler for the Fashion-MNIST DiT teacher; writes a PNG grid (one row per class).

    python -m examples.foreign_teacher.sample \
        --weights=examples/foreign_teacher/weights/fmnist_dit.msgpack --w=1.0 --out=/tmp/samples_w1.png

Classifier-free guidance: eps = (1 + w) * eps(x, t, y) - w * eps(x, t, 0)   (0 = null label).
DDIM (eta = 0) on integer timesteps from 999 down to 0.
"""
import argparse
import json
import os
import struct
import zlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from examples.foreign_teacher.model import DiT, NULL_LABEL, NUM_TIMESTEPS, get_alphas_cumprod

CLASS_NAMES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']  # model labels 1..10


def load_teacher(weights):
    """Returns (model, variables) from the one-file weights and their JSON sidecar."""
    with open(os.path.splitext(weights)[0] + '.json') as f:
        meta = json.load(f)
    model = DiT(**meta['model_kwargs'])
    with open(weights, 'rb') as f:
        variables = flax.serialization.msgpack_restore(f.read())
    return model, variables


def ddim_sample(model, variables, y, w, key, num_steps=64, clip_x0=True):
    """y: int [B] labels in 1..10. Returns x0 [B, 1, 28, 28] in [-1, 1] (NCHW)."""
    acp = jnp.asarray(get_alphas_cumprod(), jnp.float32)
    ts = np.unique(np.round(np.linspace(0, NUM_TIMESTEPS - 1, num_steps)).astype(np.int32))[::-1]
    t_prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    B = y.shape[0]
    y2 = jnp.concatenate([y, jnp.full_like(y, NULL_LABEL)])

    @jax.jit
    def step(x, t, tp):
        tt = jnp.full((2 * B,), t, jnp.int32)
        eps2 = model.apply(variables, jnp.concatenate([x, x]), tt, y2, train=False)
        eps_c, eps_u = eps2[:B], eps2[B:]
        eps = (1.0 + w) * eps_c - w * eps_u
        a_t = acp[t]
        a_p = jnp.where(tp >= 0, acp[jnp.maximum(tp, 0)], 1.0)
        x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
        return jnp.sqrt(a_p) * x0 + jnp.sqrt(1.0 - a_p) * eps

    x = jax.random.normal(key, (B, 1, 28, 28))
    for t, tp in zip(ts, t_prev):
        x = step(x, jnp.int32(t), jnp.int32(tp))
    return x


def write_png(path, img):
    """img: uint8 [H, W] grayscale. Minimal PNG writer (zlib only)."""
    h, w = img.shape
    raw = b''.join(b'\x00' + img[i].tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff)

    png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0))
           + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))
    with open(path, 'wb') as f:
        f.write(png)


def make_grid(x, rows, cols, pad=2, scale=1):
    """x: [rows*cols, 1, 28, 28] in [-1, 1] -> uint8 grid image."""
    imgs = np.clip((np.asarray(x)[:, 0] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    H, W = imgs.shape[1:]
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad), np.uint8)
    for i in range(rows):
        for j in range(cols):
            r, c = pad + i * (H + pad), pad + j * (W + pad)
            grid[r:r + H, c:c + W] = imgs[i * cols + j]
    if scale > 1:
        grid = np.kron(grid, np.ones((scale, scale), np.uint8))
    return grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--weights', default='examples/foreign_teacher/weights/fmnist_dit.msgpack')
    ap.add_argument('--out', required=True)
    ap.add_argument('--w', type=float, default=1.0, help='guidance weight (0 = plain conditional)')
    ap.add_argument('--steps', type=int, default=64)
    ap.add_argument('--per_class', type=int, default=10)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--scale', type=int, default=1)
    args = ap.parse_args(argv)

    model, variables = load_teacher(args.weights)
    y = jnp.repeat(jnp.arange(1, 11, dtype=jnp.int32), args.per_class)  # a row per class
    x = ddim_sample(model, variables, y, args.w, jax.random.PRNGKey(args.seed), args.steps)
    write_png(args.out, make_grid(x, 10, args.per_class, scale=args.scale))
    print(f'wrote {args.out}: rows = {", ".join(CLASS_NAMES)}; w={args.w}, {args.steps} DDIM steps')


if __name__ == '__main__':
    main()
