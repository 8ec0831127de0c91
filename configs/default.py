"""Base configuration shared by every experiment.

Every field can be overridden on the command line, e.g.

    python -m medseg_jax.main --config=configs/unetpp.py:cpu --workdir=runs/x \
        --config.optim.lr=3e-4 --config.train.num_epochs=5

Experiment files (`configs/unet.py`, `configs/unetpp.py`) start from
`get_config()` here and change only what differs.
"""

import ml_collections


def get_config(arg=None):
  """Returns the base config: the seed-002 ISIC recipe on synthetic lesions."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Input. `source='synthetic'` needs no files: procedural dermoscopy-like lesions.
  config.data = ml_collections.ConfigDict()
  config.data.source = 'synthetic'
  config.data.image_size = 256
  config.data.num_classes = 1  # 1 = binary (sigmoid); K >= 2 = softmax, 0 is background.
  config.data.in_channels = 3
  config.data.class_names = ()  # Names of classes 1..K-1 for reports.
  config.data.synthetic = ml_collections.ConfigDict(
      dict(num_patients=400, images_per_patient=5, seed=0))
  # Procedural BraTS-like volumes (`source='synthetic3d'`).
  config.data.synthetic3d = ml_collections.ConfigDict(dict(
      num_patients=24, volume_size=(32, 64, 64), in_channels=4, seed=0))
  # Files on disk (`source` in 'isic2018', 'folder', 'nifti'): the data folder,
  # which is only ever read. See README "Your own data".
  config.data.root = ''
  # Raw mask values in class order, e.g. (0, 255); () = 0/255 or 0/1 for
  # binary, 0..K-1 as they are for K classes.
  config.data.label_values = ()
  config.data.folder = ml_collections.ConfigDict(dict(
      images='images', masks='masks', mask_suffix='', manifest=''))
  config.data.isic = ml_collections.ConfigDict(dict(metadata_csv=''))
  # Decoded (and preprocessed) cases: 'memory', 'disk' (in cache_dir, default
  # ~/.cache/medseg_jax/cases) or 'none'.
  config.data.cache = 'memory'
  config.data.cache_dir = ''
  # Volumes: intensity normalisation per case and optional resampling.
  config.data.preprocess = ml_collections.ConfigDict(dict(
      # 'zscore', 'ct', 'percentile', 'none', or 'suv' (PET DICOM series
      # in body-weight SUV, the factor from the DICOM tags).
      intensity='zscore',
      zscore_foreground=False,
      ct_window=(-1000.0, 1000.0),
      clip_percentiles=(0.5, 99.5),
      target_spacing=(),  # () keeps the native spacing; else (D, H, W) mm.
      # Register every other channel of a case to this channel (-1: off)
      # before normalisation, once per case (medseg_jax/register_cases.py;
      # transforms cached, report in <workdir>/registration.csv), with a
      # 'rigid' or 'affine' transform and the 'mattes_mi' (multi-modal) or
      # 'ncc' metric. Prediction registers new cases the same way.
      register_to=-1,
      register_kind='rigid',
      register_metric='mattes_mi',
  ))
  # Volumes: '3d' trains on random patches, '2d' on axial slices (with
  # `slice_context` neighbouring slices on each side as extra channels).
  config.data.volume_mode = '3d'
  config.data.slice_context = 0
  # 3D training patch (D, H, W); () trains on whole images. A share
  # `foreground_oversample` of patches is centred on foreground (nnU-Net: 1/3).
  config.data.patch_size = ()
  config.data.foreground_oversample = 0.33
  # Patient-level split, deterministic from `split_seed`.
  config.data.val_fraction = 0.15
  config.data.test_fraction = 0.15
  config.data.split_seed = 0
  # True: use the data set's own train/val/test (ISIC 2018's validation and
  # test folders, a manifest's split column) instead of the seeded split.
  config.data.official_splits = False
  # Check every file of a file data set before training (all problems listed
  # at once; `--mode=check_data` runs the same check alone).
  config.data.check = True
  # Share of the training patients used (nested: 0.1 of them are in 0.25).
  config.data.train_fraction = 1.0
  # k-fold cross-validation by patient: num_folds > 1 replaces the validation
  # split by fold `fold` of the non-test patients.
  config.data.num_folds = 0
  config.data.fold = 0
  # Per-channel normalisation of images scaled to [0, 1] (ImageNet statistics).
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  # Grain worker processes per JAX process (0 = load in the main process).
  config.data.worker_count = 2
  config.data.prefetch_buffer_size = 4
  # Where training augmentation (config.data.augment) and normalisation run:
  # 'host' (Grain workers, NumPy/SciPy) or 'device' (inside the jitted train
  # step, per example, same ranges and order; the host only loads, cuts
  # patches and batches). Same distributions, different random draws.
  config.data.augment_on = 'host'
  config.data.augment = ml_collections.ConfigDict(dict(
      flip=True,
      rot90=True,
      rotate_axes=(0, 1),  # Plane of rot90 and rotations; (1, 2) for volumes.
      affine_prob=0.5,
      rotate_degrees=15.0,
      scale_min=0.9,
      scale_max=1.1,
      color_prob=0.8,
      brightness=0.2,
      contrast=0.2,
      saturation=0.1,
      hue=0.02,
      # Intensity and elastic augmentation (volumes; 0 = off).
      gamma_prob=0.0,
      gamma_range=(0.7, 1.5),
      noise_prob=0.0,
      noise_std=0.1,
      blur_prob=0.0,
      blur_sigma=(0.5, 1.0),
      intensity_prob=0.0,
      intensity_scale=0.25,
      elastic_prob=0.0,
      elastic_alpha=0.0,
      elastic_sigma=0.0,
  ))

  config.model = ml_collections.ConfigDict()
  config.model.name = 'unetpp'
  config.model.features = (32, 64, 128, 256, 512)
  config.model.norm = 'batch'
  config.model.dtype = 'bfloat16'  # Compute dtype; parameters stay float32.
  config.model.upsample = 'transpose'
  config.model.residual = False
  config.model.deep_supervision = False
  config.model.dropout_rate = 0.0
  # XLA:CPU convolution kernels (CPU only; the same values up to rounding):
  # 'eigen' (gradients 3-4x faster on wide convs), 'ynnpack' (jaxlib's
  # default, faster at widths < 32) or 'auto' (eigen when features[0] >= 32).
  # Applied when the process starts (main.py); models/cpu_conv.py.
  config.model.conv_impl = 'auto'
  # Per-axis pooling (U-Net, UNet++): one stride tuple per downsampling level
  # (len(features) - 1), e.g. ((1, 2, 2), (2, 2, 2), (2, 2, 2)) pools the
  # coarse first axis of an anisotropic volume from the second level on
  # (nnU-Net); upsampling undoes the same strides. Input sizes must be
  # multiples of the per-axis product. () = 2 along every axis.
  config.model.strides = ()

  # Loss = sum of weight * term; names are those of `medseg_jax.losses.LOSSES`.
  config.loss = ml_collections.ConfigDict()
  config.loss.weights = ml_collections.ConfigDict(dict(dice=0.5, ce=0.5))

  # AdamW with linear warmup then cosine decay (seed 002: lr 1e-4, wd 1e-4).
  config.optim = ml_collections.ConfigDict()
  # 'adamw', 'adam' or 'sgd'. nnU-Net's recipe: name='sgd', lr=1e-2,
  # momentum=0.99, nesterov=True, weight_decay=3e-5, schedule='poly',
  # warmup_epochs=0. Weight decay skips biases and norm scales (rank-1
  # parameters); AdamW's is decoupled, SGD's is an L2 term added to the
  # gradient before momentum (PyTorch's SGD weight_decay); Adam has none.
  config.optim.name = 'adamw'
  config.optim.lr = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.b1 = 0.9  # Adam(W) only.
  config.optim.b2 = 0.999  # Adam(W) only.
  config.optim.momentum = 0.99  # SGD only (0 = plain SGD).
  config.optim.nesterov = True  # SGD only: Nesterov momentum (PyTorch's form).
  # After the warmup: 'cosine' (down to lr * min_lr_ratio), 'constant', or
  # 'poly', nnU-Net's lr * (1 - t / T) ** 0.9 over the T steps after the
  # warmup (ends at 0; min_lr_ratio unused).
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 1.0
  config.optim.min_lr_ratio = 0.01
  config.optim.grad_clip_norm = 1.0
  # Reduce-on-plateau (seed 004), on top of the schedule: after
  # `plateau_patience` evaluations without a better validation Dice (relative
  # tolerance 1e-4 on 1 - Dice), the learning rate is multiplied by
  # `plateau_factor` (optax.contrib.reduce_on_plateau, fed once per
  # evaluation; its state is checkpointed with the optimiser's). 0 = off.
  config.optim.plateau_patience = 0
  config.optim.plateau_factor = 0.1

  # Durations: give `num_epochs` or `num_steps` (steps win when > 0).
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # Global batch, split over every device.
  config.train.num_epochs = 20
  config.train.num_steps = -1
  # 0: an epoch is one pass over the training cases; > 0: an epoch is this
  # many steps (nnU-Net: 250), so num_epochs, optim.warmup_epochs and
  # eval_every_epochs count them whatever the number of cases.
  config.train.steps_per_epoch = 0
  config.train.log_every_steps = 50
  config.train.eval_every_epochs = 1.0
  config.train.checkpoint_every_steps = -1  # -1: at every evaluation.
  config.train.max_checkpoints = 2
  config.train.progress_bar = True
  # TensorBoard event files in WORKDIR/tensorboard/: every scalar of
  # metrics.jsonl and validation overlays at each evaluation (a view only:
  # metrics.jsonl stays the record).
  config.train.tensorboard = True
  # Early stopping: the run ends after this many evaluations in a row without
  # a better validation Dice than the best so far (seed 004: 15); 0 = off.
  # The best checkpoint is kept, a latest one saved, and metrics.jsonl gets
  # {'split': 'early_stop', 'step', 'best_step', 'best_dice'}; starting the
  # run again reports its metrics instead of training on.
  config.train.early_stopping_patience = 0
  # Whole-case validation (nnU-Net's final validation): every k-th evaluation
  # (and the last) predicts each validation case whole, by sliding windows
  # for patch runs and slice by slice for 2D-slice runs, as --mode=evaluate
  # does (no TTA), and logs split 'val_cases' in metrics.jsonl. When on, the
  # best checkpoint and early stopping follow its Dice (other evaluations
  # save no best). 0 = off: patch runs are then scored on one patch per case.
  config.train.case_val_every = 0
  # EMA of the parameters (0 = off; e.g. 0.999): ema = d * ema + (1 - d) *
  # params after every step, starting from the initial parameters, kept in
  # the optimiser state (so resumes are exact). At each evaluation the EMA
  # parameters (with the current BatchNorm statistics) are evaluated too
  # (split 'val_ema' in metrics.jsonl) and saved in checkpoints/best_ema/
  # when their Dice beats their own best; checkpoints/best/ and early
  # stopping / plateau follow the raw parameters.
  config.train.ema_decay = 0.0
  # Gradient accumulation: each step splits the global batch into this many
  # micro-batches, run one after another, and applies one update with their
  # mean gradient, so a large batch fits on a small device. BatchNorm then
  # sees micro-batches (its running statistics update once per micro-batch);
  # use model.norm='instance' or 'group' for updates equal to the full
  # batch's. batch_size / grad_accum_steps must split over the devices.
  config.train.grad_accum_steps = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32
  config.eval.threshold = 0.5
  # --mode=evaluate / predict. Runs trained on patches predict by sliding
  # windows of the training patch; `overlap` and `blend` as in nnU-Net.
  config.eval.overlap = 0.5
  config.eval.blend = 'gaussian'  # 'gaussian' or 'constant'.
  config.eval.sw_batch_size = 4
  config.eval.tta = False  # Mean of the probabilities over mirror flips.
  config.eval.postprocess = ml_collections.ConfigDict(dict(
      fill_holes=False, min_size=0, largest_component=False))
  # predict: MC-dropout samples (needs model.dropout_rate > 0; 0 = off) and
  # whether to write probability maps next to the masks.
  config.eval.mc_samples = 0
  config.eval.save_probabilities = False
  # predict: a layer name (e.g. 'enc_2', 'dec_0'; a wrong name lists the
  # valid ones) writes a Grad-CAM heat-map overlay <name>_gradcam.png per 2D
  # image; '' = off.
  config.eval.gradcam_layer = ''
  # evaluate: tolerance (mm, or pixels for photographs) of the normalized
  # surface Dice column, DeepMind's area-weighted definition; 0 = no column.
  config.eval.nsd_tolerance_mm = 0.0
  # evaluate: subgroup analysis of Dice per metadata column, e.g.
  # ('sex', 'site'), with a forest plot and subgroups.csv (medseg_jax/
  # subgroups.py). Columns come from `subgroups_csv` (case_id or patient_id
  # + columns; absolute, or relative to the cwd or data.root), else the ISIC
  # metadata CSV or the folder manifest. Numeric columns with many values
  # (age) are cut into `subgroup_bins` quantile bins.
  config.eval.subgroups = ()
  config.eval.subgroups_csv = ''
  config.eval.subgroup_bins = 4
  # evaluate: decision-curve analysis (Vickers & Elkin) of a case-level
  # decision (medseg_jax/decision_curve.py). rule: '' (off), 'volume' (act
  # when the predicted volume > `volume`, in the reports' volume unit: mm^3,
  # mm^2, or pixels for photographs) or 'max_prob' (act when the max
  # foreground probability >= the threshold probability). truth: 'volume'
  # (true volume > `volume`) or 'column' (metadata `truth_column` equals
  # `truth_positive`, e.g. diagnosis = melanoma).
  config.eval.decision = ml_collections.ConfigDict(dict(
      rule='', volume=0.0, truth='volume', truth_column='',
      truth_positive=''))

  # --mode=export: StableHLO + ONNX (+ int8 ONNX) + manifest.json + parity.json
  # in WORKDIR/export/ (medseg_jax/export.py).
  config.export = ml_collections.ConfigDict()
  config.export.quantize = ''  # '' or 'int8' (onnxruntime dynamic, QInt8).
  config.export.opset = 17  # ONNX opset of model.onnx.
  # Test-split cases the parity check predicts with every artefact; 0 = all.
  config.export.parity_cases = 8
  return config


def shrink_for_cpu(config):
  """Shrinks a full-size recipe in place so it trains in minutes on a laptop CPU.

  Same data, model family, loss and schedule; smaller images, widths and data
  set, a higher learning rate for the short schedule, and no worker processes
  (on 2 cores they would compete with the train step for the CPU).
  """
  config.data.image_size = 64
  config.data.synthetic.num_patients = 160
  config.data.synthetic.images_per_patient = 5
  config.data.worker_count = 0
  config.model.features = (8, 16, 32, 64)
  config.model.dtype = 'float32'  # bf16 convolutions are emulated (slow) on CPU.
  config.optim.lr = 2e-3
  config.optim.warmup_epochs = 0.5
  config.train.batch_size = 16
  config.train.log_every_steps = 10
  config.eval.batch_size = 64
  return config
