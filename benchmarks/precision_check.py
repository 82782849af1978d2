"""Does the fake-quantized model compute on its 8-bit grid on this backend?

  python -m benchmarks.precision_check [--data_dir=DIR] [--images=500]

Quantizes the shipped Fashion-MNIST MobileNet-v2 at W8A8 per channel
(calibrated on the first 256 test images), traces it on the default backend
(``fat.graph.trace``) and gives each layer's integer reference
(``fat.integer.run_node``: numpy, exact) the simulation's own integer inputs.
It does this twice: with the models' products at HIGHEST precision
(``fat.depthwise.PRECISION``, what the library uses) and at the backend's
DEFAULT. On the CPU both are float32; recent GPUs may run DEFAULT in TF32 and
TPUs in bfloat16, which moves fake-quantized operands off their grid.

Prints, per precision: how many layer outputs (grid indices) differ from the
reference, the largest difference in grid steps, and the share of the next
``--images`` test images whose argmax equals the integer-only run's.
"""

import os

import numpy as np
from absl import flags

import jax

from experiments import cli
from fat import checkpoints, data, depthwise, graph, integer, models, pipeline, quant, rules

CHECKPOINT = flags.DEFINE_string("checkpoint", "checkpoints/fashion_mnist/mobilenet_v2",
                                 "float checkpoint directory")
DATA_DIR = flags.DEFINE_string("data_dir", "", "folder of the Fashion-MNIST idx files "
                               "('': the Debian package's, else TFDS)")
IMAGES = flags.DEFINE_integer("images", 500, "test images compared, after the "
                              "calibration images")
CALIBRATION = 256


def layer_agreement(nodes, acts, x):
  """(grid indices that differ, all grid indices, largest difference in steps) over
  all layers."""
  diffs = integer.layer_differences(nodes, acts, x).values()
  return (sum(int(np.count_nonzero(d)) for d in diffs), sum(d.size for d in diffs),
          max(int(d.max()) for d in diffs))


def main(argv):
  del argv
  with cli.exit_on_user_error():
    run()


def run():
  if DATA_DIR.value and not os.path.isdir(DATA_DIR.value):
    raise data.DataError(f"--data_dir {DATA_DIR.value!r} does not exist; pass the folder "
                         "holding the four Fashion-MNIST idx .gz files, or leave it empty.")
  variables, meta = checkpoints.load(CHECKPOINT.value)
  model = models.create(meta["model"], **meta["model_kwargs"])
  test = data.load("fashion_mnist", "test", DATA_DIR.value or None)
  x = data.normalize(test.images[:CALIBRATION + IMAGES.value])
  cal, x = x[:CALIBRATION], x[CALIBRATION:]
  p = pipeline.prepare(model, variables, rules.uniform_rules(
      weight=quant.QuantSpec(bits=8, per_channel=True), act=quant.QuantSpec(bits=8)),
      cal, batch_size=64)
  qmodel, qvars = p.qmodel, p.variables
  device = jax.devices()[0]
  print(f"backend: {jax.default_backend()} ({device.device_kind}), "
        f"{len(x)} test images, {meta['model']} width {meta['model_kwargs'].get('width')}")
  print("| products | layer outputs unequal to the integer reference | largest difference "
        "(steps) | argmax equal to the integer-only run % |")
  print("|---|---|---|---|")
  reference = integer.logits(graph.trace(qmodel, qvars, x[:2]), x).argmax(-1)
  for precision in (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT):
    depthwise.PRECISION = precision  # read when the model is traced
    jax.clear_caches()
    nodes, acts = graph.trace(qmodel, qvars, x, return_activations=True)
    differ, total, worst = layer_agreement(nodes, acts, x)
    sim = np.asarray(jax.jit(qmodel.apply)(qvars, x)).argmax(-1)
    print(f"| {precision.name} | {differ:,} of {total:,} | {worst} | "
          f"{100 * np.mean(sim == reference):.1f} |", flush=True)


if __name__ == "__main__":
  cli.run(main)
