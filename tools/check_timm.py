"""Checks the timm importer against timm itself: max |logit difference|.

Needs torch and timm (not project requirements; imported only when run).
Creates the timm model with random weights (BN statistics and affine
parameters randomized too, so that their mapping is exercised) or loads a
given safetensors file, writes/reads it through
``fat.models.timm_safetensors.load_timm_safetensors``, runs both on the same random
images and exits 1 when the logits differ by more than ``--tol``.

  python tools/check_timm.py --arch mnasnet_100
  python tools/check_timm.py --arch mobilenetv2_100 --safetensors model.safetensors
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fat.models import timm_safetensors  # pylint: disable=wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=sorted(timm_safetensors.TIMM_ARCHS), default="mobilenetv2_100")
  p.add_argument("--safetensors", default=None,
                 help="timm weights to check; default: random weights")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit difference|")
  return p.parse_args(argv)


def import_torch_timm():
  """(torch, timm), or None after printing what is missing."""
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"check_timm needs torch and timm, which are not installed ({e}).\n"
          "Install them in a separate environment, e.g. pip install torch timm.",
          file=sys.stderr)
    return None
  return torch, timm


def randomize_(torch, model, seed: int) -> None:
  """Random conv/linear weights and BN weight, bias, running mean and var (> 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith("running_var"):
        t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
      elif name.endswith("weight") and t.ndim == 1:  # BN gamma
        t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
      elif t.ndim == 1:  # BN beta and running mean, classifier bias
        t.copy_(torch.randn(t.shape, generator=g) * 0.2)
      else:
        fan_in = t[0].numel()
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def timm_model(torch, timm, arch: str, path: str | None, seed: int):
  """The timm model in eval mode, from ``path`` or with random weights."""
  if path is None:
    model = timm.create_model(arch, pretrained=False)
    randomize_(torch, model, seed)
  else:
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    state = load_file(path)
    model = timm.create_model(arch, pretrained=False,
                              num_classes=state["classifier.weight"].shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
      raise ValueError(f"timm rejects {path}: missing {missing}, unexpected {unexpected}")
  return model.eval()


def save_state(model, path: str) -> None:
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def max_logit_diff(torch, tmodel, path: str, arch: str, x: np.ndarray) -> tuple[float, float]:
  """(max |timm - ours|, max |timm|) on NHWC images ``x``."""
  import jax  # pylint: disable=import-outside-toplevel
  model, variables = timm_safetensors.load_timm_safetensors(path, arch)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


def main(argv=None) -> int:
  args = parse_args(argv)
  libs = import_torch_timm()
  if libs is None:
    return 2
  torch, timm = libs
  tmodel = timm_model(torch, timm, args.arch, args.safetensors, args.seed)
  x = np.random.default_rng(args.seed).normal(
      size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  with tempfile.TemporaryDirectory() as d:
    path = args.safetensors
    if path is None:
      path = str(pathlib.Path(d) / f"{args.arch}.safetensors")
      save_state(tmodel, path)
    diff, scale = max_logit_diff(torch, tmodel, path, args.arch, x)
  ok = diff <= args.tol
  print(f"{args.arch} ({args.safetensors or 'random weights'}), {args.batch}x"
        f"{args.image_size}px: max |logit| {scale:.4g}, max |logit diff| {diff:.3g} "
        f"(tol {args.tol:g}): {'OK' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
