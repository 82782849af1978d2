"""PyTorch MobileNet-v2 and MNASNet-B1, the float reference of ``benchmarks/step_speed.py``.

A baseline for timing only, not part of ``fat``: the same layer structure and
channel counts as ``fat.models`` (stem stride 2, ReLU6 / ReLU, BN after every
conv), NCHW, trained with Adam and cross-entropy like ``fat.float_training``.
Needs torch (``pip install torch==2.13.0`` takes the CPU build on our machines).
"""

from __future__ import annotations


import torch
from torch import nn

from benchmarks import timing
from fat.models import mnasnet, mobilenet_v2


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act=nn.ReLU6):
  layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
  return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):

  def __init__(self, cin, cout, expansion, k, stride, act):
    super().__init__()
    hidden = cin * expansion
    layers = [conv_bn(cin, hidden, act=act)] if expansion != 1 else []
    layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=act),
               conv_bn(hidden, cout, act=None)]
    self.body = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    y = self.body(x)
    return x + y if self.residual else y


def mobilenet_v2_torch(width: float, num_classes: int = 10) -> nn.Module:
  ch = lambda c: mobilenet_v2.make_divisible(int(c * width))
  stem = mobilenet_v2.make_divisible(32 * width)
  layers, cin = [conv_bn(3, stem, 3, 2)], stem
  for t, c, n, s in mobilenet_v2.STAGES:
    for r in range(n):
      layers.append(InvertedResidual(cin, ch(c), t, 3, s if r == 0 else 1, nn.ReLU6))
      cin = ch(c)
  last = mobilenet_v2.make_divisible(1280 * width) if width > 1.0 else 1280
  layers.append(conv_bn(cin, last))
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))


def mnasnet_torch(width: float, num_classes: int = 10) -> nn.Module:
  ch = lambda c: mnasnet.round_to_multiple_of(c * width)
  layers = [conv_bn(3, ch(32), 3, 2, act=nn.ReLU),
            conv_bn(ch(32), ch(32), 3, 1, groups=ch(32), act=nn.ReLU),
            conv_bn(ch(32), ch(16), act=None)]
  cin = ch(16)
  for e, k, c, n, s in mnasnet.STAGES:
    for r in range(n):
      layers.append(InvertedResidual(cin, ch(c), e, k, s if r == 0 else 1, nn.ReLU))
      cin = ch(c)
  layers.append(conv_bn(cin, 1280, act=nn.ReLU))
  return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes))


def time_train_step(name: str, width: float, size: int, batch: int, repeats: int):
  """(first-step seconds, median step seconds) of a float Adam train step on the CPU.

  Channels-last (NHWC) memory layout, oneDNN's fast path for depthwise
  convolutions: about twice the throughput of the default NCHW here.
  """
  torch.manual_seed(0)
  model = (mobilenet_v2_torch if name == "mobilenet_v2" else mnasnet_torch)(width)
  model = model.to(memory_format=torch.channels_last)
  model.train()
  opt = torch.optim.Adam(model.parameters(), 1e-3)
  x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
  y = torch.arange(batch) % 10
  loss_fn = nn.CrossEntropyLoss()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  return timing.timed(step, repeats)  # PyTorch on the CPU returns when done
