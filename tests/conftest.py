"""Session-wide test settings, applied before any test module imports a library."""

import os

# Keras picks its backend once, at its first import; the importer tests need JAX.
# TensorFlow-based test modules collected earlier could otherwise import Keras
# with its TensorFlow default first.
os.environ.setdefault("KERAS_BACKEND", "jax")
