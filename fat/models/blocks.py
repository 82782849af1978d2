"""Building blocks shared by MobileNet-v2 and MNASNet.

Each block runs in any ``QuantMode`` stage (see ``fat.layers``): in "float" it
is conv -> BatchNorm -> activation; once folded, the BN lives in the conv's
bias and the block's output quantizer (``act_q``) fake-quantizes what an int8
kernel would read next.

Blocks take and return ``(x, step)``: the tensor and its quantization grid
step (None outside "quant" mode), so that each conv can put its bias on the
int32 grid of ``input step * weight step``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fat.layers import ActQuant, Conv, Dense, QuantMode

ACTIVATIONS = {"relu": nn.relu, "relu6": nn.relu6, None: None}


class ConvBNAct(nn.Module):
  """Conv (or depthwise conv) + BN + optional ReLU/ReLU6, then ``act_q``.

  Submodules: ``conv`` (params ``kernel``, plus ``bias`` once folded), ``bn``
  (float stage only) and ``act_q`` (the output quantizer; unsigned after a
  ReLU, signed after a linear projection).
  """

  features: int
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  act: str | None = "relu6"
  padding: str = "same"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99
  dw_impl: str = "auto"
  mode: QuantMode = QuantMode()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, x_step=None):
    y = Conv(self.features, self.kernel_size, self.strides, self.depthwise,
             use_bias=self.mode.folded, padding=self.padding, dw_impl=self.dw_impl,
             mode=self.mode, dtype=self.dtype, name="conv")(x, x_step)
    if not self.mode.folded:
      y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_eps, dtype=self.dtype, name="bn")(y)
    if self.act is not None:
      y = ACTIVATIONS[self.act](y)
    return ActQuant(self.mode, signed=self.act is None, name="act_q")(y)


class InvertedResidual(nn.Module):
  """MobileNet-v2 inverted residual / MNASNet MBConv block.

  expand 1x1 (skipped when ``expansion == 1``) -> depthwise kxk -> linear 1x1
  projection, plus a residual add (quantized by ``add_q``) when the stride is
  1 and the channel count is unchanged.
  """

  features: int
  expansion: int
  kernel_size: int = 3
  strides: int = 1
  act: str = "relu6"
  residual: bool = True
  padding: str = "same"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99
  dw_impl: str = "auto"
  mode: QuantMode = QuantMode()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, x_step=None):
    cin = x.shape[-1]
    common = dict(padding=self.padding, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                  dw_impl=self.dw_impl, mode=self.mode, dtype=self.dtype)
    y, step = x, x_step
    if self.expansion != 1:
      y, step = ConvBNAct(cin * self.expansion, act=self.act, name="expand",
                          **common)(y, train, step)
    y, step = ConvBNAct(y.shape[-1], self.kernel_size, self.strides, depthwise=True,
                        act=self.act, name="dw", **common)(y, train, step)
    y, step = ConvBNAct(self.features, act=None, name="project", **common)(y, train, step)
    if self.residual and self.strides == 1 and cin == self.features:
      y, step = ActQuant(self.mode, signed=True, name="add_q")(x + y)
    return y, step


def classifier_head(x, num_classes: int, mode: QuantMode):
  """Global average pool -> ``pool_q`` -> dense ``classifier`` -> ``logits_q``.

  Call from inside a compact ``__call__``: the submodules bind to that module.
  Returns the logits.
  """
  x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))  # bf16 -> f32
  x, step = ActQuant(mode, signed=False, name="pool_q")(x)
  x = Dense(num_classes, mode=mode, name="classifier")(x, step)
  return ActQuant(mode, signed=True, name="logits_q")(x)[0]
