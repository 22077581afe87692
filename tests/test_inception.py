"""Tests for gdistill.eval.inception (hermetic; the real-weight test is opt-in).

Set GDISTILL_INCEPTION_WEIGHTS=/path/to/pt_inception-2015-12-05-6726825d.pth (needs
torch) or to its converted .npz to run the real-weight test.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gdistill.eval import inception

# torchvision Inception-v3 without AuxLogits has 23,834,568 parameters with a
# 1000-way fc; the FID network's 1008-way fc adds 8 * (2048 + 1) = 16,392.
EXPECTED_NUM_PARAMS = 23_850_960
# BatchNorm running mean + var of 94 BasicConv2d layers.
EXPECTED_NUM_BATCH_STATS = 34_432
NUM_CONVS = 94

# A few pytorch-fid state_dict entries (PyTorch layouts) the loader must consume.
KNOWN_TORCH_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.weight": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}

_SMALL = 75  # smallest input the network accepts; 299 is the FID protocol size


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _torch_shape(path, shape):
  if path[-1] == "kernel" and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if path[-1] == "kernel" and len(shape) == 2:
    return shape[::-1]
  return tuple(shape)


@pytest.fixture(scope="module")
def fake_state_dict():
  """A pytorch-fid-shaped state_dict of deterministic random numpy arrays."""
  rng = np.random.default_rng(0)
  shapes = inception.inception_variables_shapes()
  state = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in traverse_util.flatten_dict(shapes[collection]).items():
      key = inception._torch_key(collection, path)
      shape = _torch_shape(path, leaf.shape)
      if path[-1] == "kernel":
        fan_in = np.prod(shape[1:])
        value = rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)
      elif path[-1] == "var":
        value = rng.uniform(0.5, 1.5, size=shape)
      elif path[-1] == "scale":
        value = rng.uniform(0.8, 1.2, size=shape)
      else:
        value = rng.standard_normal(shape, np.float32) * 0.1
      state[key] = np.asarray(value, np.float32)
      if path[-1] == "mean":
        state[key.replace("running_mean", "num_batches_tracked")] = np.array(0)
  return state


@pytest.fixture(scope="module")
def fake_npz(tmp_path_factory, fake_state_dict):
  path = tmp_path_factory.mktemp("inception") / "fake_inception.npz"
  np.savez(path, **fake_state_dict)
  return path


@pytest.fixture(scope="module")
def fake_variables(fake_npz):
  return inception.load_inception_params(fake_npz)


def test_exact_parameter_count():
  shapes = inception.inception_variables_shapes()
  assert _count(shapes["params"]) == EXPECTED_NUM_PARAMS
  assert _count(shapes["batch_stats"]) == EXPECTED_NUM_BATCH_STATS
  # Every conv has kernel + BN scale/bias; plus fc kernel/bias.
  assert len(jax.tree_util.tree_leaves(shapes["params"])) == 3 * NUM_CONVS + 2


def test_state_dict_naming_matches_pytorch_fid(fake_state_dict):
  for key, shape in KNOWN_TORCH_SHAPES.items():
    assert fake_state_dict[key].shape == shape, key
  n_entries = sum(not k.endswith("num_batches_tracked") for k in fake_state_dict)
  assert n_entries == NUM_CONVS * 5 + 2  # conv weight + 4 BN entries each, fc w/b


def test_load_npz_converts_layouts(fake_variables, fake_state_dict):
  variables = fake_variables
  conv = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  assert conv.shape == (1, 7, 128, 128)  # HWIO
  np.testing.assert_array_equal(
      conv, np.transpose(fake_state_dict["Mixed_6b.branch7x7_2.conv.weight"],
                         (2, 3, 1, 0)))
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"],
                                fake_state_dict["fc.weight"].T)
  np.testing.assert_array_equal(
      variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
      fake_state_dict["Mixed_7c.branch_pool.bn.running_var"])


def test_converted_conv_matches_torch_cross_correlation(fake_variables,
                                                       fake_state_dict):
  """Conv2d_1a_3x3 (stride 2, no padding) against a direct NCHW/OIHW reference."""
  variables = fake_variables
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
  w = fake_state_dict["Conv2d_1a_3x3.conv.weight"]  # [O, I, kh, kw]
  prefix = "Conv2d_1a_3x3.bn."
  ref = np.zeros((2, 4, 4, 32))
  for i in range(4):
    for j in range(4):
      patch = x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # [B, kh, kw, I]
      ref[:, i, j, :] = np.einsum("bhwi,oihw->bo", patch, w)
  ref = (ref - fake_state_dict[prefix + "running_mean"]) / np.sqrt(
      fake_state_dict[prefix + "running_var"] + 1e-3)
  ref = np.maximum(ref * fake_state_dict[prefix + "weight"]
                   + fake_state_dict[prefix + "bias"], 0.0)
  block = inception.BasicConv2d(32, (3, 3), strides=2,
                                precision=jax.lax.Precision.HIGHEST)
  sub = {c: variables[c]["Conv2d_1a_3x3"] for c in ("params", "batch_stats")}
  np.testing.assert_allclose(block.apply(sub, x), ref, rtol=1e-4, atol=1e-4)


def test_forward_shapes(fake_variables):
  variables = fake_variables
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  # batch_size 2 exercises the padded last batch.
  pool, logits = inception.inception_features_and_logits(
      variables, images, batch_size=2, resize_to=_SMALL)
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert np.isfinite(pool).all() and (pool >= 0).all()  # mean of ReLU outputs
  # Default logits are the unbiased pool @ W used by the reference IS code.
  np.testing.assert_allclose(
      logits, pool @ np.asarray(variables["params"]["fc"]["kernel"]),
      rtol=1e-4, atol=1e-4)
  pool_again, _ = inception.inception_features_and_logits(
      variables, images[1:], batch_size=2, resize_to=_SMALL)
  np.testing.assert_allclose(pool_again, pool[1:], rtol=1e-5, atol=1e-6)


def test_preprocess_range_and_grayscale():
  rng = np.random.default_rng(6)
  gray = rng.integers(0, 256, size=(2, 20, 24, 1), dtype=np.uint8)
  gray[:, :4, :4] = 0
  gray[:, -4:, -4:] = 255
  x = np.asarray(inception.preprocess(gray, resize_to=40))
  assert x.shape == (2, 40, 40, 3) and x.dtype == np.float32
  assert x[:, 0, 0].min() == -1.0 and x[:, -1, -1].max() == pytest.approx(1.0)
  np.testing.assert_array_equal(
      x, inception.preprocess(np.repeat(gray, 3, axis=-1), resize_to=40))
  with pytest.raises(ValueError, match="1 or 3"):
    inception.preprocess(np.zeros((1, 8, 8, 2), np.uint8))


def test_pool_branches_follow_tensorflow_padding_semantics():
  """Average pools ignore padded zeros; the Mixed_7c max pool pads with -inf."""
  x = -1.0 - np.arange(16.0).reshape(1, 4, 4, 1)  # all negative
  avg = np.asarray(inception._avg_pool_same_exclude_pad(jnp.asarray(x)))[0, ..., 0]
  assert avg[0, 0] == pytest.approx(x[0, :2, :2, 0].mean())
  assert avg[0, 1] == pytest.approx(x[0, :2, :3, 0].mean())
  assert avg[1, 1] == pytest.approx(x[0, :3, :3, 0].mean())
  block = inception.FIDInceptionE(max_pool_branch=True)
  variables = jax.eval_shape(block.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, 8, 8, 2048), jnp.float32))
  assert variables["params"]["branch_pool"]["conv"]["kernel"].shape == (
      1, 1, 2048, 192)
  mx = np.asarray(jax.lax.reduce_window(
      jnp.asarray(x), -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0))))
  np.testing.assert_array_equal(
      nn.max_pool(jnp.asarray(x), (3, 3), strides=(1, 1), padding=((1, 1), (1, 1))),
      mx)
  assert mx[0, 0, 0, 0] == x[0, 0, 0, 0]  # not 0 from padding


def test_resize_matches_torch_bilinear_align_corners_false():
  """jax.image.resize(antialias=False) equals F.interpolate(align_corners=False)."""
  def torch_bilinear_1d(x, out):
    n = x.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = src - i0
    return x[i0] * (1 - lam) + x[i1] * lam

  rng = np.random.default_rng(3)
  for n in (28, 32, 64, 512):
    x = rng.random(n)
    y = jax.image.resize(jnp.asarray(x, jnp.float32), (299,), "bilinear",
                         antialias=False)
    np.testing.assert_allclose(y, torch_bilinear_1d(x, 299), atol=2e-5)


def test_missing_file_error_message(tmp_path):
  path = tmp_path / "nowhere" / inception.PT_INCEPTION_FILENAME
  with pytest.raises(FileNotFoundError) as info:
    inception.load_inception_params(path)
  message = str(info.value)
  assert "\n" not in message
  assert str(path) in message
  assert inception.PT_INCEPTION_URL in message
  assert "python -m gdistill.eval.inception" in message and ".npz" in message


def test_checksum_mismatch_raises(tmp_path, fake_npz):
  bogus = tmp_path / inception.PT_INCEPTION_FILENAME
  bogus.write_bytes(b"not the inception weights")
  # The .pth checksum is verified before torch is needed.
  with pytest.raises(ValueError, match="sha256"):
    inception.load_inception_params(bogus)
  with pytest.raises(ValueError, match="sha256"):
    inception.load_inception_params(fake_npz, expected_sha256="0" * 64)


def test_wrong_or_incomplete_state_dict_is_rejected(fake_state_dict):
  incomplete = dict(fake_state_dict)
  del incomplete["Mixed_5c.branch5x5_2.bn.running_mean"]
  with pytest.raises(KeyError, match="Mixed_5c.branch5x5_2.bn.running_mean"):
    inception.state_dict_to_variables(incomplete)

  wrong = dict(fake_state_dict)
  wrong["fc.weight"] = wrong["fc.weight"][:1000]
  with pytest.raises(ValueError, match="fc.weight"):
    inception.state_dict_to_variables(wrong)

  extra = dict(fake_state_dict, **{"AuxLogits.fc.weight": np.zeros((1008, 768))})
  with pytest.raises(KeyError, match="AuxLogits"):
    inception.state_dict_to_variables(extra)


@pytest.mark.skipif("GDISTILL_INCEPTION_WEIGHTS" not in os.environ,
                    reason="set GDISTILL_INCEPTION_WEIGHTS to the FID Inception file")
def test_real_weights(monkeypatch):
  path = os.environ["GDISTILL_INCEPTION_WEIGHTS"]
  variables = inception.load_inception_params(path)
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
  pool, logits = inception.inception_features_and_logits(
      variables, images, batch_size=4, include_fc_bias=True)
  assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
  assert np.isfinite(pool).all() and (pool >= 0).all()
  pool_again, unbiased = inception.inception_features_and_logits(
      variables, images[:3], batch_size=2)
  np.testing.assert_allclose(pool_again, pool[:3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      logits[:3] - unbiased, np.broadcast_to(variables["params"]["fc"]["bias"],
                                             (3, 1008)), rtol=1e-3, atol=1e-3)
  # Optional cross-check against pytorch-fid itself.
  # pylint: disable=import-outside-toplevel
  try:
    import torch
    from pytorch_fid import inception as torch_inception
  except ImportError:
    return
  # Feed pytorch-fid the same weights instead of letting it download them.
  if path.endswith(".npz"):
    with np.load(path) as data:
      state = {k: torch.from_numpy(data[k]) for k in data.files}
  else:
    state = torch.load(path, map_location="cpu")
  monkeypatch.setattr(torch_inception, "load_state_dict_from_url",
                      lambda *args, **kwargs: state)
  net = torch_inception.InceptionV3([3]).eval()
  with torch.no_grad():
    ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
  np.testing.assert_allclose(pool, ref[:, :, 0, 0].numpy(), rtol=1e-3, atol=1e-3)


def test_matches_pytorch_fid_with_random_weights(fake_state_dict, fake_variables,
                                                 monkeypatch):
  """Same random weights through pytorch-fid's own network (if installed)."""
  torch = pytest.importorskip("torch")
  torch_inception = pytest.importorskip("pytorch_fid.inception")
  state = {k: torch.from_numpy(np.asarray(v)) for k, v in fake_state_dict.items()}
  monkeypatch.setattr(torch_inception, "load_state_dict_from_url",
                      lambda *args, **kwargs: state)
  net = torch_inception.InceptionV3([3]).eval()
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(2, 48, 40, 3), dtype=np.uint8)  # non-square
  with torch.no_grad():
    ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
  pool, _ = inception.inception_features_and_logits(fake_variables, images,
                                                    batch_size=2)
  ref = ref[:, :, 0, 0].numpy()
  np.testing.assert_allclose(pool, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
