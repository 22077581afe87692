"""Train the small class-conditional DiT on Fashion-MNIST (eps-prediction DDPM, CFG label dropout).

    python -m examples.foreign_teacher.train --workdir=/tmp/ft_run \
        --output=examples/foreign_teacher/weights/fmnist_dit.msgpack --steps=6000

Rerunning the same command resumes from <workdir>/checkpoint.msgpack.
At the end the EMA parameters are written to --output as ONE msgpack file holding
the flax variables dict {'params': ...} (float32), plus a JSON sidecar (<output> with .json) describing
the model and its conventions.
"""
import argparse
import datetime
import gzip
import json
import os
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.foreign_teacher.model import (BETA_END, BETA_START, DiT, NULL_LABEL, NUM_TIMESTEPS,
                                            get_alphas_cumprod, q_sample)

DATA_DIR = '/usr/share/datasets/fashion-mnist'

MODEL_KWARGS = dict(patch_size=4, hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0,
                    class_dropout_prob=0.1, num_classes=10)


def read_idx(path):
    """Read a gzipped IDX file (ubyte) into a numpy array."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    assert data[0] == 0 and data[1] == 0 and data[2] == 0x08, 'expected ubyte IDX'
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir=DATA_DIR):
    """Returns x [60000, 1, 28, 28] float32 in [-1, 1] (NCHW) and y int32 in 1..10 (label + 1)."""
    images = read_idx(os.path.join(data_dir, 'train-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(data_dir, 'train-labels-idx1-ubyte.gz'))
    x = images.astype(np.float32)[:, None] / 127.5 - 1.0
    y = labels.astype(np.int32) + 1
    return x, y


def save_atomic(path, data):
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--workdir', required=True)
    ap.add_argument('--output', required=True, help='where to write the EMA weights (.msgpack)')
    ap.add_argument('--steps', type=int, default=4000)
    ap.add_argument('--batch_size', type=int, default=64)
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--warmup', type=int, default=200)
    ap.add_argument('--ema_decay', type=float, default=0.999)
    ap.add_argument('--ckpt_every_s', type=float, default=180.0)
    ap.add_argument('--log_every', type=int, default=50)
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    ckpt_path = os.path.join(args.workdir, 'checkpoint.msgpack')

    x_train, y_train = load_fashion_mnist()
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    n_train = x_train.shape[0]
    print(f'data: {x_train.shape} {x_train.dtype} labels {int(y_train.min())}..{int(y_train.max())}', flush=True)

    model = DiT(**MODEL_KWARGS)
    acp = get_alphas_cumprod()
    B = args.batch_size

    key = jax.random.PRNGKey(args.seed)
    init_key, train_key = jax.random.split(key)
    params = model.init({'params': init_key, 'label_dropout': init_key},
                        jnp.zeros((1, 1, 28, 28)), jnp.zeros((1,), jnp.int32),
                        jnp.ones((1,), jnp.int32))['params']
    n_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(params))
    print(f'DiT {MODEL_KWARGS}: {n_params:,} parameters', flush=True)

    warmup = min(args.warmup, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1),
                                                  end_value=0.1 * args.lr)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    state = dict(params=params, ema=params, opt_state=tx.init(params), step=0)

    if os.path.exists(ckpt_path):
        with open(ckpt_path, 'rb') as f:
            state = flax.serialization.from_bytes(state, f.read())
        state['step'] = int(state['step'])
        print(f'resumed from {ckpt_path} at step {state["step"]}', flush=True)

    @jax.jit
    def train_step(params, ema, opt_state, step):
        k = jax.random.fold_in(train_key, step)
        k_idx, k_t, k_eps, k_drop = jax.random.split(k, 4)
        idx = jax.random.randint(k_idx, (B,), 0, n_train)
        x0, y = x_train[idx], y_train[idx]
        t = jax.random.randint(k_t, (B,), 0, NUM_TIMESTEPS)
        eps = jax.random.normal(k_eps, x0.shape)
        xt = q_sample(x0, t, eps, acp)

        def loss_fn(p):
            pred = model.apply({'params': p}, xt, t, y, train=True, rngs={'label_dropout': k_drop})
            return jnp.mean((pred - eps) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(args.ema_decay, (1.0 + step) / (10.0 + step))  # EMA warm-up
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, ema, opt_state, loss

    # Wall time across resumes is accumulated in a small file in the workdir.
    wall_path = os.path.join(args.workdir, 'wall_time.json')
    wall_prev = json.load(open(wall_path))['wall_s'] if os.path.exists(wall_path) else 0.0

    def save_ckpt():
        save_atomic(ckpt_path, flax.serialization.to_bytes(state))
        with open(wall_path, 'w') as f:
            json.dump({'wall_s': wall_prev + time.time() - t_start, 'step': int(state['step'])}, f)

    p, e, o = state['params'], state['ema'], state['opt_state']
    step0 = state['step']
    t_start = time.time()
    t_last_ckpt = t_start
    t_log, step_log = t_start, step0
    losses = []
    step = step0
    while step < args.steps:
        p, e, o, loss = train_step(p, e, o, jnp.asarray(step, jnp.int32))
        step += 1
        losses.append(loss)
        if step % args.log_every == 0 or step == args.steps:
            lv = float(jnp.mean(jnp.stack(losses[-args.log_every:])))
            now = time.time()
            rate = (step - step_log) / max(now - t_log, 1e-9)
            t_log, step_log = now, step
            eta = (args.steps - step) / max(rate, 1e-9)
            print(f'step {step}/{args.steps} loss {lv:.4f} {rate:.2f} steps/s '
                  f'lr {float(schedule(step)):.2e} ETA {eta / 60:.1f} min', flush=True)
            losses = losses[-1000:]
        if time.time() - t_last_ckpt > args.ckpt_every_s or step == args.steps:
            state = dict(params=p, ema=e, opt_state=o, step=step)
            save_ckpt()
            t_last_ckpt = time.time()
            print(f'checkpoint saved at step {step}', flush=True)

    state = dict(params=p, ema=e, opt_state=o, step=step)
    wall = wall_prev + (time.time() - t_start if step > step0 else 0.0)
    sidecar_path = os.path.splitext(args.output)[0] + '.json'
    final_loss = float(jnp.mean(jnp.stack(losses[-200:]))) if losses else None
    if final_loss is None and os.path.exists(sidecar_path):
        final_loss = json.load(open(sidecar_path)).get('final_train_loss')

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    ema32 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), state['ema'])
    save_atomic(args.output, flax.serialization.to_bytes({'params': ema32}))
    sidecar = {
        'format': 'flax.serialization msgpack of the variables dict {"params": ...} (EMA weights, float32)',
        'architecture': 'DiT (examples/foreign_teacher/model.py, Flax linen, adaLN-zero, kvfrans/jax-diffusion-transformer style)',
        'model_class': 'examples.foreign_teacher.model.DiT',
        'model_kwargs': MODEL_KWARGS,
        'num_params': n_params,
        'call': 'model.apply(variables, x, t, y, train=False, force_drop_ids=None) -> eps',
        'conventions': {
            'layout': 'NCHW',
            'input_shape': [None, 1, 28, 28],
            'pixel_range': [-1.0, 1.0],
            'time_input': 'integer DDPM timestep index t in {0..999}',
            'num_timesteps': NUM_TIMESTEPS,
            'beta_schedule': 'linear',
            'beta_start': BETA_START,
            'beta_end': BETA_END,
            'alphas_cumprod': 'cumprod(1 - betas)',
            'forward_process': 'x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) eps',
            'output': 'eps',
            'null_label': NULL_LABEL,
            'labels': 'dataset class + 1 (real classes 1..10)',
            'label_dropout': MODEL_KWARGS['class_dropout_prob'],
            'cfg_rule': 'eps = (1 + w) * eps(x, t, y) - w * eps(x, t, 0)',
        },
        'dataset': 'Fashion-MNIST train (60k), ' + DATA_DIR,
        'training': {
            'steps': step,
            'batch_size': B,
            'lr': args.lr,
            'lr_schedule': f'linear warmup {warmup} steps, cosine decay to 0.1*lr',
            'optimizer': 'adamw(weight_decay=0) + clip_by_global_norm(1.0)',
            'ema_decay': args.ema_decay,
            'seed': args.seed,
            'wall_time_s': round(wall, 1),
        },
        'final_train_loss': final_loss,
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': 'python -m examples.foreign_teacher.train ' + ' '.join(sys.argv[1:] if argv is None else argv),
    }
    with open(sidecar_path, 'w') as f:
        json.dump(sidecar, f, indent=2)
    print(f'wrote {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB) and {sidecar_path}; '
          f'final loss {final_loss}, wall {wall / 60:.1f} min', flush=True)


if __name__ == '__main__':
    main()
