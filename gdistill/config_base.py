"""The full set of config keys with defaults; each file in configs/ starts here.

Only the driver reads configs: everything below it takes keyword arguments.
"""

from __future__ import annotations

import ml_collections

PHASE_STAGES = ('teacher', 'stage1', 'stage2')

# Guided consistency distillation (stage `consistency`, gdistill/consistency.py): the keys
# besides the optimiser's, with their defaults (workdir.ADDED reads them too: workdirs
# recorded before the method behave as these).
CONSISTENCY_KEYS = dict(
    # The guided ODE solver whose DDIM step makes the target: 'stage1' (the stage-1
    # student at w, 1 network evaluation) or 'teacher' (the guided teacher, 2).
    solver='stage1',
    # The phase the student starts from: 'stage1' (a copy) or 'teacher' (its weights
    # plus a zero-initialised w branch, as stage 1 starts).
    init='stage1',
    # The solver's time grid t_n = n / grid_steps and the skip k: the target is one DDIM
    # step of k / grid_steps (LCM's skipping-step solver).
    grid_steps=64, skip=2,
    # 'pseudo_huber' (iCT) or 'l2'; w_balance / w_min_frac: as stage 1's.
    distance='pseudo_huber', w_balance=False, w_min_frac=0.0,
    # Multistep consistency sampling's step counts: the grids and evaluation rows.
    sample_steps=(1, 2, 4, 8))


def _optim(**kw) -> ml_collections.ConfigDict:
  d = dict(num_steps=1000, batch_size=128, learning_rate=2e-4, warmup_steps=100,
           lr_decay='constant', grad_clip=1.0, ema_decay=0.0, ema_warmup=False,
           checkpoint_every=500, dropout=None,
           # The phase's loss weighting (diffusion.LOSS_WEIGHTINGS); '': diffusion.weighting.
           weighting='')
  d.update(kw)
  return ml_collections.ConfigDict(d)


def dit_model(*, size: str, patch_size: int, hidden_size: int, depth: int, num_heads: int,
              mlp_ratio: float = 4.0, dropout: float = 0.0, w_relative: bool = False,
              w_embedding: str = 'fourier', w_warmup_steps: int = 0,
              remat: bool = False) -> ml_collections.ConfigDict:
  """The model section of a DiT (gdistill/models/dit.py), to replace base_config's
  U-Net section: ``c.model = dit_model(size='b2', patch_size=2, ...)``.

  Every structural key is written out (as the U-Net's section writes out its size's
  values), so the config, the workdir's config.json and the checkpoint meta say what
  the network is. ``w_relative``, ``w_embedding`` and ``w_warmup_steps`` as the U-Net's
  (base_config); ``remat`` recomputes each transformer block in the backward pass and
  is not part of the network.
  """
  return ml_collections.ConfigDict(dict(
      arch='dit', size=size, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
      num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout, w_relative=w_relative,
      w_embedding=w_embedding, w_warmup_steps=w_warmup_steps, remat=remat))


def config_file(path: str, *, relative_to: str = '') -> ml_collections.ConfigDict:
  """``get_config()`` of the config file at ``path`` (relative to the directory of the file
  ``relative_to``, e.g. a config's ``__file__``): a config built on another."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if relative_to:
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  name = 'gdistill_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Stages the driver runs in order. Training stages: teacher, stage1, stage2, consistency;
  # then eval (FID/IS sweep) and translate (image-to-image grids).
  c.stages = ('teacher', 'stage1', 'stage2')
  # A finished teacher to distil instead of training one: a workdir or its
  # checkpoints/teacher directory. Empty: train (or resume) the teacher here.
  c.teacher_checkpoint = ''
  c.multihost = False       # call jax.distributed.initialize() (auto on TPU pods)
  c.sharding = 'replicated'  # or 'fsdp'
  c.precision = 'float32'    # or 'bfloat16' (compute only; params stay float32)
  # On CPU, compile train steps and samplers with gdistill.xla_options.CPU_TUNED
  # (weight-gradient convolutions by XLA's own runtime, not YNNPACK): faster, see
  # benchmarks/README.md.
  c.cpu_xla_tuned = True
  c.mesh = ml_collections.ConfigDict({'data': -1})
  c.log_every = 50

  # num_workers: Grain worker processes reading and decoding the training batches per
  # process (0: a reader thread in the trainer; -1: one per 4 usable cores, at most 8).
  c.data = ml_collections.ConfigDict(dict(
      name='fashion_mnist', split='train', eval_split='test', data_dir='', download=False,
      num_workers=-1))

  # Between the images and the diffusion (gdistill/codec.py): '' is pixels; a file written by
  # ``python -m gdistill.autoencoder`` makes a latent run (the networks, samplers and losses
  # work on its latents, encoded on the fly; samples are decoded to images).
  c.codec = ml_collections.ConfigDict(dict(path=''))

  c.diffusion = ml_collections.ConfigDict(dict(mean_type='v', weighting='snr_trunc'))

  # The network: one architecture's keys (gdistill/models/registry.py). This is the
  # U-Net's section (no ``arch`` key: 'unet', as in every run before DiTs); a config
  # replaces it whole with ``dit_model(...)`` for a DiT.
  c.model = ml_collections.ConfigDict(dict(
      size='fmnist', ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
      dropout=0.1,
      # True: the w branch's output minus its output at w = 0 (models/unet.py), so a stage-1
      # student starts as, and at w = 0 stays closer to, its teacher.
      w_relative=False,
      # The students' w branch (models/unet.py): 'fourier' (gdistill's: Fourier features of
      # 250 w, last layer zero-initialised) or 'authors' (the paper code's inv_cos w input,
      # last layer not zero: pair it with w_warmup_steps).
      w_embedding='fourier',
      # Stage 1 multiplies the w branch's output by min(1, step / w_warmup_steps) (the
      # authors' 10000); 0: no warm-up. Read by the loss, not part of the network.
      w_warmup_steps=0,
      # The authors' U-Net options (w_unet3.py): multi-head attention with this many
      # channels per head (their head_dim=64; 0: single-head), and down/upsampling by
      # residual blocks (their resblock_resample=True; False: strided conv / upsample + conv).
      attn_head_dim=0,
      resblock_resample=False,
      # Recompute each U-Net block in the backward pass (activation checkpointing):
      # only block inputs are kept for it, for about 1/3 more step compute
      # (benchmarks/memory.py measures the bytes). Not part of the network:
      # checkpoints load with either value.
      remat=False))

  # Guidance weights w: students are trained on w ~ U[w_min, w_max]. teacher_clip: where a
  # clipping sampler clips the guided teacher: 'guided' (x_hat^w) or 'branches' (the
  # conditional and unconditional x_hat each, x_hat^w not: the authors' way); sampling only.
  c.guidance = ml_collections.ConfigDict(dict(w_min=0.0, w_max=4.0, teacher_clip='guided'))

  c.teacher = _optim(num_steps=10000, learning_rate=2e-4, warmup_steps=200, ema_decay=0.999)
  c.teacher.p_uncond = 0.1
  # The teacher to distil, when it is not gdistill's own network: 'python:pkg.module:factory'
  # names a function of the config returning a gdistill.teacher_source.ForeignTeacher (README:
  # "Bring your own teacher"). Empty: gdistill's network of config.model.
  c.teacher.source = ''
  # Accept a teacher whose noise path ends far from pure noise (e.g. Stable Diffusion's
  # scaled-linear table, alpha(1) = 0.068): refused by default (teacher_source.py says why).
  c.teacher.allow_signal_at_t1 = False
  c.stage1 = _optim(num_steps=2000, learning_rate=1e-4, warmup_steps=100, ema_decay=0.0,
                    dropout=0.0)
  # True: each example's loss divided by (1 + w)^2, so the large-w examples (whose guided
  # targets lie furthest from the conditional output) do not drown the small-w ones.
  c.stage1.w_balance = False
  # The fraction of examples (in expectation) trained at w = guidance.w_min exactly, the
  # rest at w ~ U[w_min, w_max]: more of them holds the student to its teacher there.
  c.stage1.w_min_frac = 0.0
  # Stage 2: one halving from 2N to N steps each, from start_steps/2 down to min_steps.
  c.stage2 = _optim(num_steps=1000, learning_rate=1e-4, warmup_steps=0, lr_decay='linear',
                    ema_decay=0.0, dropout=0.0)
  c.stage2.w_min_frac = 0.0  # as stage1.w_min_frac, for every halving
  c.stage2.start_steps = 64   # the stage-1 model is the 64-step teacher
  c.stage2.min_steps = 1
  # Training steps of particular halvings instead of num_steps: ((student steps, training
  # steps), ...), e.g. ((2, 100), (1, 100)) spends less on the 2- and 1-step students.
  c.stage2.num_steps_for = ()
  c.stage2.time_grid = 'both'  # or 'deterministic'
  c.stage2.w_balance = False  # as stage1.w_balance, for each halving's loss
  # The paper's separate students for the stochastic sampler (METHOD.md section 5): for each
  # of `sampler_steps` (2N, e.g. (8, 4)), an N-step student trained at every point of the
  # 1/(2N) grid to match two steps of the 2N-step DDIM student, starting from a copy of the
  # N-step DDIM student (init='ddim': a fine-tune) or of its 2N-step teacher ('teacher').
  # Phases stage2s_nNNNN, trained with stage2 after its halvings; they need
  # time_grid='deterministic' (a 'both' student already serves the stochastic sampler).
  c.stage2.stochastic = _optim(num_steps=150, learning_rate=5e-5, warmup_steps=0,
                               lr_decay='linear', ema_decay=0.0, dropout=0.0)
  c.stage2.stochastic.update(sampler_steps=(), init='ddim', w_balance=False, w_min_frac=0.0)
  # Guided consistency distillation (stage `consistency`, beside or instead of stage2):
  # one student for every step count (CONSISTENCY_KEYS above). ema_decay: the EMA target
  # network's (LCM: 0.95), which is also the model sampled.
  c.consistency = _optim(num_steps=1000, learning_rate=1e-4, warmup_steps=0,
                         lr_decay='linear', ema_decay=0.95, dropout=0.0)
  del c.consistency['weighting']  # its loss is `distance`, unweighted
  c.consistency.update(CONSISTENCY_KEYS)

  # Sample grids written when a phase finishes: a row per class.
  c.samples = ml_collections.ConfigDict(dict(
      per_class=8, max_classes=10, teacher_steps=64, teacher_w=1.0, student_w=(0.0, 1.0, 4.0)))

  # A running phase keeps its last max_to_keep checkpoints (full train state); a finished
  # one keeps only its sampling parameters unless keep_train_state (needed to train it
  # longer later: a larger num_steps of a constant-schedule phase resumes it).
  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=2, keep_train_state=False))

  # Quality while training: a quick FID (IS, precision, recall) of each phase that samples,
  # with the evaluation's feature network (eval.feature_net; gdistill's classifier is
  # trained first if absent), written to TensorBoard (PHASE/quick_fid_w0, ...) and the log.
  # Each phase samples as it is used: the teacher with guided DDIM at `steps` (2 network
  # evaluations a step), stage 1 at `steps` (1 a step), an N-step student at N steps.
  # `teacher_every` / `student_every`: every that many steps, 0 for the end of the phase
  # only. Same labels and noise at every point, so the curve is the network's.
  c.track = ml_collections.ConfigDict(dict(
      enabled=False, num_samples=512, batch_size=128, steps=32, w_values=(0.0, 1.0),
      teacher_every=0, student_every=0))

  # Image-to-image translation (METHOD.md section 6): encode an image of class A with
  # reverse DDIM under A (at w = encode_w), decode under class B (at w). The encoder is
  # distilled like stage 2: the stage-1 model is the encoder_start_steps-step teacher,
  # halved down to encoder_min_steps (phases encoder_nXXXX).
  c.translate = ml_collections.ConfigDict()
  c.translate.distill_encoder = True
  # Without a distilled encoder, the stage-1 model's DDIM steps to encode with in the
  # distilled routes (0: as many as the decoder's).
  c.translate.encode_steps = 0
  c.translate.encoder_start_steps = 32
  c.translate.encoder_min_steps = 4
  c.translate.encoder = _optim(num_steps=1000, learning_rate=1e-4, warmup_steps=0,
                               lr_decay='linear', ema_decay=0.0, dropout=0.0)
  c.translate.encoder.time_grid = 'both'  # or 'deterministic'
  c.translate.encode_w = 0.0    # guidance weight of the encoder (source condition)
  c.translate.w = 1.0           # guidance weight of the decoder (target condition)
  # (source, target) labels; Fashion-MNIST: sneaker -> ankle boot, shirt -> T-shirt.
  c.translate.pairs = ((7, 9), (6, 0))
  c.translate.num_per_pair = 8     # grid columns (test-split images of the source class)
  c.translate.ddim_steps = 64      # the undistilled reference (stage-1 model both ways)
  c.translate.distilled_steps = (4, 8)  # distilled encoder + stage-2 student
  c.translate.quality_per_pair = 100    # images per pair for translate/quality.json

  # Evaluation sweep (stage `eval`, or `python -m gdistill.evaluate --workdir=DIR`):
  # FID / IS / precision-recall of every setting, written to DIR/eval/. Rows:
  #   teacher       guided DDIM at each teacher_steps (2 NFE per step), every w;
  #   teacher_ddim  the same sampler at few steps (teacher_ddim_steps): the baseline;
  #   student       every finished stage-2 student (student_steps, () = all) with each
  #                 sampler: ddim at its own N steps, stochastic at 2N steps (the paper's
  #                 sampler takes jumps of 1/N on the 1/(2N) grid the N-step student was
  #                 trained on); 1 NFE per step;
  #   consistency   the finished consistency student, multistep consistency sampling at
  #                 each consistency.sample_steps (in student_steps, () = all); 1 NFE per step.
  # Rows with more NFE than expensive_nfe (0: no limit) run only at w in expensive_w.
  # The same labels (i mod K) and noise serve every row; finished rows are kept in
  # DIR/eval/report.json and reused when the sweep is rerun or extended.
  c.eval = ml_collections.ConfigDict(dict(
      num_samples=1000, batch_size=200, seed=0,  # batch: splits over 1, 2, 4, 8 devices
      w_values=(0.0, 0.3, 1.0, 2.0, 4.0),
      models=('teacher', 'teacher_ddim', 'student', 'consistency'),
      teacher_steps=(256, 64), teacher_ddim_steps=(1, 2, 4, 8, 16), student_steps=(),
      samplers=('ddim', 'stochastic'),
      expensive_nfe=0, expensive_w=(0.0, 1.0),
      # auto: gdistill's own classifier for fashion_mnist / mnist, Inception-v3 otherwise
      # (inception_weights: a local .pth or .npz). classifier_path '': DIR/eval/classifier.npz,
      # trained there if absent; share one file between runs whose numbers must compare
      # (a relative path is looked up in the working directory, then next to the package).
      feature_net='auto', inception_weights='', classifier_path='',
      # A one-file teacher's rows measured once (gdistill.eval.teacher_rows): reused when
      # made from this teacher file under this protocol, else sampled. '': always sampled.
      teacher_rows='',
      classifier_steps=2400, classifier_batch_size=128, classifier_learning_rate=2e-3,
      reference_split='train', reference_examples=0,  # 0: the whole split, else its first N
      floor_split='',  # '': data.eval_split (held-out images: the FID floor)
      precision_recall_k=3, grid_per_class=8))

  return c
