"""Where FAT's trained alphas ended up, per setting of a main-job workdir.

  python -m benchmarks.threshold_stats --workdir=runs/default

Reads ``<workdir>/checkpoints/<setting>`` and prints, for weight and
activation alphas separately, how many lie below, at or above the ends of
``alpha_range`` and how many inside it. An alpha outside the range gets a
zero gradient (METHOD.md section 1) and stops training; with
``config.fat.project_thresholds`` (the default) none should be outside.
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import flags

from benchmarks import tables
from experiments import cli, deploy
from fat import checkpoints
from fat.layers import TRAINABLE_COLLECTION

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Main-job workdir with checkpoints/<setting>/.")
flags.mark_flags_as_required(["workdir"])


def _has_kernel(params: Mapping, module_path) -> bool:
  """Whether the module at ``module_path`` owns a kernel (a weight quantizer's module)."""
  node = params
  for key in module_path:
    node = node.get(key) if isinstance(node, Mapping) else None
  return isinstance(node, Mapping) and "kernel" in node


def alpha_counts(thresholds, params, alpha_range) -> dict[str, dict[str, int]]:
  """{"weight" | "activation": {"n", "below", "at_lo", "inside", "at_hi", "above"}}.

  An alpha is a weight's when its module holds a kernel in ``params``;
  otherwise it belongs to an activation quantizer (act_q, add_q, pool_q, ...).
  """
  lo32, hi32 = np.float32(alpha_range[0]), np.float32(alpha_range[1])
  out = {}
  for path, a in jax.tree_util.tree_leaves_with_path(thresholds):
    keys = [k.key for k in path]
    if keys[-1] != "alpha":
      continue
    role = "weight" if _has_kernel(params, keys[:-1]) else "activation"
    a = np.ravel(np.asarray(a, np.float32))
    c = out.setdefault(role, dict.fromkeys(("n", "below", "at_lo", "inside", "at_hi",
                                            "above"), 0))
    c["n"] += a.size
    c["below"] += int(np.sum(a < lo32))
    c["at_lo"] += int(np.sum(a == lo32))
    c["inside"] += int(np.sum((a > lo32) & (a < hi32)))
    c["at_hi"] += int(np.sum(a == hi32))
    c["above"] += int(np.sum(a > hi32))
  return out


def main(argv):
  del argv
  with cli.exit_on_user_error():
    rows = []
    for setting in deploy.setting_names(FLAGS.workdir):
      path = os.path.join(FLAGS.workdir, "checkpoints", setting)
      variables, meta = checkpoints.load(path)
      checkpoints.require(meta, ("fat",), path, "re-run the main job")
      counts = alpha_counts(variables[TRAINABLE_COLLECTION], variables["params"],
                            meta["fat"]["alpha_range"])
      project = meta["fat"].get("project_thresholds", False)
      for role in sorted(counts):
        c = counts[role]
        rows.append([setting, str(project), role] + [str(c[k]) for k in c])
  head = ["setting", "projected", "alphas", "n", "below range", "at low end", "inside",
          "at high end", "above range"]
  print(tables.markdown(head, rows))


if __name__ == "__main__":
  cli.run(main)
