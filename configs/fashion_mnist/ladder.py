"""The bit-width ladder on MobileNet-v2: the main job with one setting per rung.

``benchmarks/ladder.py`` builds its settings from this file's rungs (its flags
choose the rungs, the granularity, the network and the first/last-layer width)
and draws the result; as a plain main job this config runs the full ladder,
eight rungs per channel and per tensor, stem and classifier weights at the
rung's width:
  python -m experiments.main --config=configs/fashion_mnist/ladder.py --workdir=runs/ladder_job
The ladder benchmark (resumes, keeps finished rungs, draws ladder.png):
  python -m benchmarks.ladder --workdir=runs/ladder
"""

import ml_collections

from configs import default

# (weight bits, activation bits), widest first.
RUNGS = ((8, 8), (6, 6), (5, 5), (4, 8), (4, 6), (4, 4), (3, 8), (2, 8))
QUICK = ((8, 8), (4, 8), (4, 4), (3, 8))
GRANULARITIES = {"per_channel": True, "per_tensor": False}
# --net of the benchmarks: the shipped float checkpoints.
NETWORKS = {"mobilenet_v2": "checkpoints/fashion_mnist/mobilenet_v2",
            "mnasnet": "checkpoints/fashion_mnist/mnasnet"}


def rung_label(weight_bits: int, act_bits: int) -> str:
  """``W4A8``: a rung as the plots and tables name it."""
  return f"W{weight_bits}A{act_bits}"


def parse_rung(text: str) -> tuple[int, int]:
  """``"w4a8"`` (any case) -> ``(4, 8)``; a one-line ValueError otherwise."""
  t = text.strip().lower()
  w, sep, a = t[1:].partition("a")
  if not (t.startswith("w") and sep and w.isdigit() and a.isdigit()):
    raise ValueError(f"a rung is written w<weight bits>a<activation bits>, e.g. w4a8; "
                     f"got {text!r}.")
  return int(w), int(a)


def setting_name(weight_bits: int, act_bits: int, per_channel: bool,
                 first_last_bits: int = 0) -> str:
  """``w4a8_pc``, ``w4a8_pt``; ``_fl8`` when stem and classifier stay at 8 bits."""
  name = f"w{weight_bits}a{act_bits}_{'pc' if per_channel else 'pt'}"
  return name + (f"_fl{first_last_bits}" if first_last_bits else "")


def rung_settings(rungs=RUNGS, granularities=tuple(GRANULARITIES),
                  first_last_bits: int = 0) -> list:
  """One main-job setting per (granularity, rung), per channel first."""
  unknown = sorted(set(granularities) - set(GRANULARITIES))
  if unknown or not granularities:
    raise ValueError(f"granularity must be among {tuple(GRANULARITIES)}, got "
                     f"{list(granularities)}.")
  if first_last_bits not in (0, 8):
    raise ValueError(f"first_last_bits must be 8 (stem and classifier weights at 8 bits) "
                     f"or 0 (at the rung's width), got {first_last_bits}.")
  if not rungs:
    raise ValueError("no rungs given.")
  out = []
  for g in sorted(set(granularities), key=list(GRANULARITIES).index):
    for w, a in rungs:
      out.append(default.setting(setting_name(w, a, GRANULARITIES[g], first_last_bits), w, a,
                                 GRANULARITIES[g], first_last_bits=first_last_bits))
  return out


def mixed_setting(name: str, overrides, act_bits: int = 8, per_channel: bool = True,
                  weight_bits: int = 8) -> ml_collections.ConfigDict:
  """A setting with per-layer widths (``fat.pipeline.Setting.overrides``: data, e.g.
  a ``fat.allocation`` result); ``weight_bits`` is the width of layers no override names."""
  s = default.setting(name, weight_bits, act_bits, per_channel)
  s.overrides = tuple(tuple(o) for o in overrides)
  return s


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = default.get_config(arg)
  c.settings = rung_settings()
  if arg == "smoke":
    c.settings = rung_settings(((8, 8), (4, 8)), ("per_channel",))
  return c
