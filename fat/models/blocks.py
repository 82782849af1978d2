"""Building blocks shared by MobileNet-v2 and MNASNet.

Each block runs in any ``QuantMode`` stage (see ``fat.layers``): in "float" it
is conv -> BatchNorm -> activation; once folded, the BN lives in the conv's
bias and the block's output quantizer (``act_q``) fake-quantizes what an int8
kernel would read next.

Blocks take and return ``(x, step)``: the tensor and its quantization grid
step (None outside "quant" mode), so that each conv can put its bias on the
int32 grid of ``input step * weight step``.

Blocks and networks inherit their shared attributes (padding, BN epsilon and
momentum, depthwise implementation, mode, dtype) from ``Common`` and hand
them on with ``self.common()``. Each block also tells ``fat.graph`` how it
exports (``graph.register`` / ``graph.register_glue`` below its class).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fat import depthwise, graph
from fat.layers import ActQuant, Conv, Dense, QuantMode

ACTIVATIONS = {"relu": nn.relu, "relu6": nn.relu6, None: None}
# The attributes every block and network shares, handed on unchanged to each child block.
COMMON_FIELDS = ("padding", "bn_eps", "bn_momentum", "dw_impl", "mode", "dtype")


class Common(nn.Module):
  """The attributes every block and network shares (keyword-only).

  Attributes:
    padding: "same" (TF/Keras) or "symmetric" (PyTorch/timm); see
      ``fat.depthwise.conv_padding``.
    bn_eps: BatchNorm epsilon (Keras 1e-3, PyTorch 1e-5).
    bn_momentum: BatchNorm momentum of the running statistics.
    dw_impl: depthwise implementation, "auto" picks by backend.
    mode: pipeline stage and quantizer rules (``fat.layers.QuantMode``).
    dtype: compute dtype of the convolutions and BatchNorm.
  """

  _: dataclasses.KW_ONLY
  padding: str = "same"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.99
  dw_impl: str = "auto"
  mode: QuantMode = QuantMode()
  dtype: Any = jnp.float32

  @nn.nowrap
  def common(self) -> dict:
    """The shared attributes as keyword arguments, for a child block."""
    return {f: getattr(self, f) for f in COMMON_FIELDS}


class ConvBNAct(Common):
  """Conv (or depthwise conv) + BN + optional ReLU/ReLU6, then ``act_q``.

  Submodules: ``conv`` (params ``kernel``, plus ``bias`` once folded), ``bn``
  (float stage only) and ``act_q`` (the output quantizer; unsigned after a
  ReLU, signed after a linear projection). Exports as one "conv" node.
  """

  features: int
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  act: str | None = "relu6"

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


@graph.register(ConvBNAct)
def conv_node(call: graph.Call, g: graph.Builder) -> graph.Node:
  """A ``ConvBNAct`` (or subclass) call as one "conv" node: the folded ``conv``,
  the activation as a clamp, and the grid of ``act_q``."""
  m = call.module
  w = g.weights(f"{call.path}/conv")
  pads = tuple(depthwise.conv_padding(call.in_shape[i], m.kernel_size, m.strides, m.padding)
               for i in (1, 2))
  attrs = {**w, "stride": m.strides, "pads": pads, "depthwise": m.depthwise, "act": m.act}
  return graph.Node(op="conv", name=call.path, inputs=(call.src,),
                    out=g.grid(f"{call.path}/act_q"), attrs=attrs)


class InvertedResidual(Common):
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

  @nn.compact
  def __call__(self, x, train: bool = False, x_step=None):
    cin = x.shape[-1]
    y, step = x, x_step
    if self.expansion != 1:
      y, step = ConvBNAct(cin * self.expansion, act=self.act, name="expand",
                          **self.common())(y, train, step)
    y, step = ConvBNAct(y.shape[-1], self.kernel_size, self.strides, depthwise=True,
                        act=self.act, name="dw", **self.common())(y, train, step)
    y, step = ConvBNAct(self.features, act=None, name="project",
                        **self.common())(y, train, step)
    if self.residual and self.strides == 1 and cin == self.features:
      y, step = ActQuant(self.mode, signed=True, name="add_q")(x + y)
    return y, step


@graph.register_glue(InvertedResidual)
def residual_add(block: graph.Call, quantizer: graph.Call, g: graph.Builder):
  """``add_q`` quantizes the sum of the block's input and its ``project`` output:
  one "add" node."""
  if quantizer.module.name != "add_q" or block.src is None:
    return None
  return graph.Node(op="add", name=quantizer.path, inputs=(block.src, f"{block.path}/project"),
                    out=g.grid(quantizer.path))


class Network(Common):
  """A classifier built from these blocks that ends in ``classifier_head``.

  Attributes (besides ``Common``'s):
    num_classes: classifier outputs.
    width: the width multiplier; each network says which are allowed.
    small_input: stem stride 1 instead of 2, keeping twice the resolution for
      28-64 px inputs.
  """

  num_classes: int = 1000
  width: float = 1.0
  small_input: bool = False


def classifier_head(x, num_classes: int, mode: QuantMode):
  """Global average pool -> ``pool_q`` -> dense ``classifier`` -> ``logits_q``.

  Call from inside the compact ``__call__`` of a ``Network``: the submodules
  bind to it, and its export declares ``pool_q`` a global average pool.
  Returns the logits.
  """
  x = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))  # bf16 -> f32
  x, step = ActQuant(mode, signed=False, name="pool_q")(x)
  x = Dense(num_classes, mode=mode, name="classifier")(x, step)
  return ActQuant(mode, signed=True, name="logits_q")(x)[0]


@graph.register_glue(Network)
def global_pool(_net: graph.Call, quantizer: graph.Call, g: graph.Builder):
  """``classifier_head``'s ``pool_q`` quantizes the global average pool of the
  last conv: one "mean" node."""
  last = g.nodes[-1] if g.nodes else None
  if (quantizer.module.name != "pool_q" or len(quantizer.in_shape) != 2 or last is None
      or last.op != "conv"):
    return None
  return graph.Node(op="mean", name=quantizer.path, inputs=(last.name,),
                    out=g.grid(quantizer.path))
