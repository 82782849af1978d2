"""The paper's exact recipe and each of our additions switched on alone (the
ablation table of docs/convergence.md and configs/paper/README.md), on the
Fashion-MNIST settings where PTQ loses accuracy: W4A4 and W3A8 per-channel and
W6A6 per-tensor on MobileNet-v2, W8A8 per-tensor on MNASNet (args
``mnasnet_<row>``).

Rows (the config argument): ``exact`` (or '': ``config.fat.recipe = "paper"``),
``projection``, ``keep_best``, ``best_start``, ``lr_by_width``
(``"paper+<row>"``), ``rescaling`` (the exact recipe with ``config.equalize``),
``ours`` (every addition but rescaling: the default recipe, keep-best on 500
held-out images and per-width learning rates) and ``ours_rescaling`` (ours with
``config.equalize``). Rows without the best-PTQ start run only the min/max PTQ
baseline beside FAT.

Run one row (each writes report.json with FAT's top-1 per setting):
  python -m experiments.main --config=configs/fashion_mnist/paper_ablation.py:exact \
      --workdir=runs/ablation/exact
The whole table, one folder per row, and its markdown (docs/convergence.md):
  python -m benchmarks.fat_convergence --config=configs/fashion_mnist/paper_ablation.py:exact \
      --workdir=runs/ablation/mobilenet_v2 --label=exact
  (then each other row as its own --label; mnasnet_<row> into runs/ablation/mnasnet)
"""

from configs import default

ROWS = ("exact", "projection", "keep_best", "best_start", "lr_by_width", "rescaling", "ours",
        "ours_rescaling")
ARGS = ("", "smoke") + ROWS + tuple(f"mnasnet_{r}" for r in ROWS)


def get_config(arg: str = ""):
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; valid: '' (the exact recipe), 'smoke', "
                     f"a row {ROWS} or 'mnasnet_<row>'.")
  net, row = ("mnasnet", arg[len("mnasnet_"):]) if arg.startswith("mnasnet_") else ("", arg)
  c = default.get_config("smoke" if row == "smoke" else "")
  row = "exact" if row in ("", "smoke") else row
  if net == "mnasnet":
    c.model_checkpoint = "checkpoints/fashion_mnist/mnasnet"
    c.settings = [default.setting("w8a8_per_tensor", 8, 8, False)]
  elif arg != "smoke":
    c.settings = [default.setting("w4a4_per_channel", 4, 4, True),
                  default.setting("w3a8_per_channel", 3, 8, True),
                  default.setting("w6a6_per_tensor", 6, 6, False)]
  ours = row in ("ours", "ours_rescaling")
  c.fat.recipe = ("ours" if ours else "paper" if row in ("exact", "rescaling")
                  else f"paper+{row}")
  c.equalize = row in ("rescaling", "ours_rescaling")
  if row != "best_start" and not ours:
    c.methods = ("ptq_minmax", "fat")
  return c
