"""Defaults for the FAT main job (config.job == "fat"); variants override a few fields.

Run (MobileNet-v2 on the embedded Fashion-MNIST benchmark):
  python -m experiments.main --config=configs/default.py --workdir=runs/default
"""

import ml_collections

# What get_config takes: the text after ':' in --config=<file>.py:<arg>.
ARGS = ("", "smoke")


def check_arg(arg: str) -> None:
  """Rejects a config argument other than those in ``ARGS`` (a typo would otherwise
  run the full job)."""
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; valid: '' (--config=<file>.py, the "
                     "full run) or 'smoke' (--config=<file>.py:smoke, a tiny run).")


def setting(name, weight_bits, act_bits, per_channel, weight_kind="symmetric",
            act_kind="symmetric", first_last_bits=0):
  """One quantization setting; ``first_last_bits`` > 0 keeps stem and classifier weights
  at that width (a rule override)."""
  return ml_collections.ConfigDict(dict(
      name=name, weight_bits=weight_bits, act_bits=act_bits, per_channel=per_channel,
      weight_kind=weight_kind, act_kind=act_kind, first_last_bits=first_last_bits))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  check_arg(arg)
  c = ml_collections.ConfigDict()
  c.job = "fat"
  c.model_checkpoint = "checkpoints/fashion_mnist/mobilenet_v2"
  # A pretrained file instead of model_checkpoint (fat/models/pretrained.py):
  # format "keras" | "timm" | "tf_mnasnet", path, and arch for timm.
  c.pretrained = ml_collections.ConfigDict(dict(format="", path="", arch=""))
  c.dataset = "fashion_mnist"    # or "imagenet2012" (TFDS), "imagenet_folder"
  c.data_dir = ""
  # ImageNet only: the weight source's preprocessing (fat/imagenet.py PREPROCESS),
  # the input size, and the folder of the downloaded tars for TFDS preparation.
  c.preprocess = "keras"
  c.image_size = 224
  c.manual_dir = ""
  c.seed = 0
  c.eval_examples = 0            # 0: the whole test split
  c.eval_batch_size = 500
  c.calibration_images = 512
  c.calibration_batch_size = 128
  # Methods to run on every setting (fat/methods/; "ptq_minmax" and "fat" are
  # required); add "qat" for the full-QAT baseline (configs/fashion_mnist/*_qat.py).
  c.methods = ("ptq_minmax", "ptq_percentile", "ptq_mse", "fat")
  c.percentile = 99.99
  # ptq_mse on asymmetric quantizers: search beta (where the shortened range
  # sits) together with alpha, instead of shortening the range from its top end
  # only (fat/mse.py). Symmetric and unsigned quantizers are unaffected.
  c.mse_shift = False
  # Mutual rescaling (DFQ cross-layer equalization, fat/equalize.py) of the
  # folded params before quantization: conv pairs joined by ReLU, ReLU6 (bounded
  # by the calibration maxima) or no activation, e.g. depthwise -> project. The
  # fp32 row and FAT's teacher keep the unrescaled params.
  c.equalize = False
  # What rescaling equalizes: "weights" (DFQ: the two kernels' ranges, for
  # per-tensor weights) or "activations" (every channel of each ReLU/ReLU6
  # tensor a depthwise conv reads to one range, for per-tensor activations over
  # per-channel weights). Read only with equalize = True.
  c.equalize_target = "weights"
  # DFQ's empirical bias correction (fat/bias_correction.py) of every PTQ
  # method's variables on the calibration images; FAT starts from them.
  c.bias_correction = False
  c.settings = [
      setting("w8a8_per_channel", 8, 8, True),
      setting("w8a8_per_tensor", 8, 8, False),
      setting("w4a8_per_channel", 4, 8, True),
      # Where post-training quantization loses accuracy (6.9 pt for the best PTQ
      # method here): the setting that separates the methods.
      setting("w4a4_per_channel", 4, 4, True),
  ]
  c.fat = ml_collections.ConfigDict(dict(
      # "ours" (these fields) or "paper": the paper's exact recipe (start from
      # ptq_minmax with alpha = 1, no projection, no keep_best, no held-out
      # images, unsigned ReLU outputs without beta); "paper+<addition>" switches
      # one of ours back on (fat/recipes.py, configs/paper/README.md).
      recipe="ours",
      train_fraction=0.1,        # unlabeled share of the train split
      batch_size=100,
      epochs=2,
      learning_rate=1e-3,
      # True: scale each quantizer's learning rate by 7 / (2^(bits-1) - 1) of
      # its width (learning_rate is then the 4-bit rate), so that one Adam step
      # moves a threshold by the same share of its grid step at every width
      # (docs/convergence.md). False: learning_rate for every width.
      lr_by_width=True,
      reset_steps=400,           # N of METHOD.md section 3
      lr_decay=1e-4,
      # The distillation loss: "rmse" (the paper's), "smooth_l1" (the original
      # code's) or "kl" (KL(softmax(float) || softmax(quantized)), batch mean).
      loss="rmse",
      # Unlabeled images withheld from training (drawn by the seed, none of them
      # calibration images): FAT's start is the PTQ result with the lowest
      # distillation loss on them, and keep_best scores on them. 0: both score
      # the calibration images, which FAT also trains on.
      holdout_images=500,
      # Keep the thresholds with the lowest distillation loss on the held-out
      # images, scored at the start and every select_every steps (0: at each
      # epoch end), instead of the last ones: never worse than the start there.
      keep_best=True,
      select_every=20,
      # Stop after this many scores in a row without a new best (0: never).
      patience=3,
      alpha_range=(0.5, 1.0),
      beta_range=(-0.2, 0.4),
      # Clip alpha/beta into their ranges after each update (False: the
      # original recipe, where a threshold past its range stops training).
      project_thresholds=True,
  ))
  c.qat = ml_collections.ConfigDict(dict(
      batch_size=100, epochs=1, learning_rate=1e-5, train_fraction=1.0))
  # AdaRound (method "ptq_adaround", fat/methods/adaround.py): learned rounding
  # on the weight grid of the `start` PTQ result ("best": the PTQ method with
  # the lowest distillation loss on the calibration images, as FAT's start), by
  # reconstructing each layer's (granularity "layer") or block's ("block")
  # float output from the quantized model's input ("quantized"; "float"; or
  # "qdrop": each input element the float model's with probability `drop_prob`)
  # on the calibration images (`images` > 0: the first that many unlabeled
  # images), with the annealed regularizer.
  c.adaround = ml_collections.ConfigDict(dict(
      start="best", granularity="layer", iterations=300, batch_size=32,
      learning_rate=1e-2, reg_weight=0.01, warmup=0.2, beta_range=(20.0, 2.0),
      input="quantized", drop_prob=0.5, quantize_output=False, images=0, layers=".*",
      threshold_learning_rate=1e-3))
  # FAT after AdaRound ("fat_adaround": activation thresholds; "fat_adaround_all":
  # every threshold) follows config.fat's recipe; "fat_adaround_joint" trains
  # the activation thresholds inside AdaRound's loop instead, unit by unit, at
  # adaround.threshold_learning_rate, with each unit's output quantizer in its
  # loss.
  # LSQ/LSQ+ (method "lsq", fat/methods/lsq.py): QAT with LSQ-scaled step-size
  # gradients, SGD with momentum and cosine decay (or "adam"), from `start`, at
  # `learning_rate`, or at `lr_by_bits`'s rate for the setting's weight width
  # (8-bit weights at 1e-4: at 1e-3 LSQ lands below float there; docs/peers.md).
  c.lsq = ml_collections.ConfigDict(dict(
      start="ptq_mse", optimizer="sgd", learning_rate=1e-3, lr_by_bits=((8, 1e-4),),
      momentum=0.9, batch_size=100, epochs=1, train_fraction=0.1))
  c.log_every = 20
  # Trained methods save a step checkpoint this often; a killed job resumes
  # from it when started again with the same command.
  c.checkpoint_every = 20
  if arg == "smoke":
    c.eval_examples = 200
    c.calibration_images = 64
    c.calibration_batch_size = 32
    c.settings = [setting("w8a8_per_channel", 8, 8, True),
                  setting("w4a8_per_channel", 4, 8, True)]
    c.fat.train_fraction = 0.004
    c.fat.batch_size = 32
    c.fat.epochs = 1
    c.fat.holdout_images = 32
  return c
