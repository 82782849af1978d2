"""A toy method in one file, the way a fork adds one: PTQ with alpha = 0.9 everywhere.

Importing this module registers ``ptq_alpha09``; a config that lists it in
``config.methods`` runs it (tests/test_methods.py).
"""

import jax
import jax.numpy as jnp

from fat import calibrate, methods
from fat.layers import TRAINABLE_COLLECTION


def run(ctx: methods.Context) -> methods.Result:
  v = calibrate.with_ranges(ctx.variables, ctx.act_ranges("minmax"))
  alphas = jax.tree.map(lambda a: jnp.full_like(a, 0.9), v[TRAINABLE_COLLECTION])
  # A report field of its own: the mean of the alphas it returns.
  mean = float(jnp.mean(jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(alphas)])))
  return methods.Result({**v, TRAINABLE_COLLECTION: alphas}, {"mean_alpha": mean})


METHOD = methods.register(methods.Method(name="ptq_alpha09", kind=methods.PTQ, run=run,
                                         description="PTQ with alpha = 0.9 everywhere"))
