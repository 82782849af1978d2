"""Datasets as numpy arrays and deterministic batch iterators.

Fashion-MNIST is read from ``data_dir`` when it is set (the four idx ``.gz``
files, or a TFDS data dir holding ``fashion_mnist``); otherwise from the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
or else from TFDS ``fashion_mnist``.
ImageNet sources live in ``fat/imagenet.py``; ``load`` picks the source of a
dataset name. Imports go one way: this module imports ``fat.imagenet``, which
imports nothing from here.

Every split, in memory (``Split``) or streamed (``fat.imagenet.StreamSplit``),
is a ``SplitLike``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from fat import imagenet
from fat.errors import DataError  # also fat.data.DataError, its older name

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DATASETS = ("fashion_mnist", "imagenet2012", "imagenet_folder")
IMAGENET_SOURCES = {"imagenet2012": "tfds", "imagenet_folder": "folder"}


@runtime_checkable
class SplitLike(Protocol):
  """What the jobs use of a split, in memory or streamed.

  ``batches`` yields normalized float32 ``(images, labels)``, or
  ``(images, labels, index)`` with ``with_index=True``; its keywords are
  ``seed``, ``epochs``, ``drop_remainder``, ``augment_images`` and ``with_index``.
  ``head`` and ``sample`` return splits of the same kind. ``isinstance`` checks
  only that the members exist; on Python 3.11 it reads ``labels``, which for
  a TFDS split is a pass over its records.
  """

  @property
  def labels(self) -> np.ndarray:
    """Integer labels (N,), in split order."""

  def __len__(self) -> int:
    ...

  def head(self, n: int) -> "SplitLike":
    """The first ``n`` examples (all of them if fewer)."""

  def sample(self, fraction: float, seed: int) -> "SplitLike":
    """A uniform random ``fraction`` (at least one example), fixed by ``seed``."""

  def batches(self, batch_size: int, **kwargs) -> Iterator:
    """Batches as described above."""


@dataclasses.dataclass(frozen=True)
class Split:
  """Images (N, H, W, C) uint8 and integer labels (N,), in memory: a ``SplitLike``."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, idx) -> "Split":
    return Split(self.images[idx], self.labels[idx])

  # SplitLike, shared with fat.imagenet.StreamSplit.
  def head(self, n: int) -> "Split":
    return self.take(np.arange(min(n, len(self))))

  def sample(self, fraction: float, seed: int) -> "Split":
    return subset(self, fraction, seed)

  def batches(self, batch_size: int, **kwargs) -> Iterator:
    return batches(self, batch_size, **kwargs)


def _read_idx(path: str) -> np.ndarray:
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"cannot read {path}: {e}. Reinstall the data "
                    "(apt-get install --reinstall dataset-fashion-mnist).") from e
  if len(raw) < 8 or raw[2] != 8:
    raise DataError(f"{path} is not an idx file of unsigned bytes.")
  ndim = raw[3]
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataError(f"{path} is truncated: {data.size} bytes for shape {dims}.")
  return data.reshape(dims)


def _missing_files(d: str) -> list[str]:
  return [f for pair in FASHION_MNIST_FILES.values() for f in pair
          if not os.path.exists(os.path.join(d, f))]


def _fashion_mnist_dir(data_dir: str | None) -> str | None:
  """The folder of the four idx files: ``data_dir`` if given, else the Debian
  package's; None means TFDS (``data_dir`` then is a TFDS data dir, or empty)."""
  if data_dir:
    missing = _missing_files(data_dir)
    if not missing:
      return data_dir
    if os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
      return None  # a TFDS data dir holding a prepared fashion_mnist
    raise DataError(f"config.data_dir {data_dir!r} holds neither the Fashion-MNIST idx "
                    f"files (missing {missing}) nor a TFDS 'fashion_mnist' folder; put the "
                    "four idx .gz files there, or leave data_dir empty to use the installed "
                    "package or TFDS.")
  return None if _missing_files(DEBIAN_FASHION_MNIST) else DEBIAN_FASHION_MNIST


def _fashion_mnist_tfds(split: str, data_dir: str | None) -> Split:
  try:
    import tensorflow_datasets as tfds
    arrays = tfds.as_numpy(tfds.load("fashion_mnist", split=split, batch_size=-1,
                                      data_dir=data_dir, download=True))
  except Exception as e:  # any TFDS failure means: no data here
    raise DataError(
        "Fashion-MNIST not found. Install it offline with "
        "`apt-get install dataset-fashion-mnist` (files in "
        f"{DEBIAN_FASHION_MNIST}), or put the four idx .gz files in config.data_dir, "
        f"or let TFDS download 'fashion_mnist' where a network is available ({e}).") from e
  return Split(arrays["image"], arrays["label"].astype(np.int32))


def load_fashion_mnist(split: str, data_dir: str | None = None) -> Split:
  """The "train" (60k) or "test" (10k) split as uint8 (N, 28, 28, 1) images."""
  if split not in FASHION_MNIST_FILES:
    raise DataError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}.")
  if data_dir and not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir!r} does not exist; set config.data_dir to the "
                    "folder holding the Fashion-MNIST idx .gz files, or leave it empty.")
  d = _fashion_mnist_dir(data_dir)
  if d is None:
    return _fashion_mnist_tfds(split, data_dir)
  img_file, lbl_file = FASHION_MNIST_FILES[split]
  images = _read_idx(os.path.join(d, img_file))
  labels = _read_idx(os.path.join(d, lbl_file)).astype(np.int32)
  if images.ndim != 3 or len(images) != len(labels):
    raise DataError(f"Fashion-MNIST files in {d} are inconsistent: images {images.shape}, "
                    f"labels {labels.shape}.")
  return Split(images[..., None], labels)


def load(dataset: str, split: str, data_dir: str | None = None, *, preprocess: str = "keras",
         image_size: int = 224, manual_dir: str | None = None) -> SplitLike:
  """``split`` ("train" or "test") of ``dataset``.

  Fashion-MNIST comes as an in-memory ``Split``; ImageNet ("imagenet2012":
  TFDS, "imagenet_folder": an image folder) as a ``fat.imagenet.StreamSplit``
  preprocessed as ``preprocess`` (a key of ``fat.imagenet.PREPROCESS``) at
  ``image_size``. Both are ``SplitLike``.
  """
  if dataset == "fashion_mnist":
    return load_fashion_mnist(split, data_dir)
  if dataset in IMAGENET_SOURCES:
    return imagenet.load(IMAGENET_SOURCES[dataset], split, data_dir,
                         imagenet.preprocess_for(preprocess, image_size), manual_dir)
  raise DataError(f"unknown dataset {dataset!r}; known: {DATASETS}.")


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def subset(split: Split, fraction: float, seed: int) -> Split:
  """A uniform random ``fraction`` of ``split`` (at least one example), fixed by ``seed``."""
  if not 0.0 < fraction <= 1.0:
    raise DataError(f"subset fraction must be in (0, 1], got {fraction}.")
  n = max(1, int(round(len(split) * fraction)))
  idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
  return split.take(idx)


def distillation_splits(train: SplitLike, *, train_fraction: float, calibration_images: int,
                        seed: int) -> tuple[SplitLike, SplitLike]:
  """``(unlabeled, calib)``: the unlabeled ``train_fraction`` sample of ``train``
  (fixed by ``seed``) that threshold training uses, and its first
  ``calibration_images`` images, which calibrate and score every method. The
  main job and the benchmarks that repeat its calibration call this."""
  unlabeled = train.sample(train_fraction, seed)
  return unlabeled, unlabeled.head(calibration_images)


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
  """Random crop with ``pad`` pixels of zero padding and random horizontal flip."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None]
  cols = dx[:, None] + np.arange(w)[None]
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def batches(split: Split, batch_size: int, *, seed: int | None = None, epochs: int = 1,
            drop_remainder: bool = False, augment_images: bool = False,
            labels: bool = True, with_index: bool = False) -> Iterator:
  """Normalized ``(images, labels)`` batches: images alone with ``labels=False``,
  ``(images, labels, indices)`` with ``with_index``.

  ``seed`` None keeps the order; otherwise each epoch is shuffled by a
  generator seeded once with ``seed``, so a seed fixes the whole stream.
  """
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}.")
  if augment_images and seed is None:
    raise ValueError("augment_images needs a seed: without one the augmentation "
                     "would differ from run to run.")
  rng = np.random.default_rng(seed)
  n = len(split)
  for _ in range(epochs):
    order = rng.permutation(n) if seed is not None else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      x = split.images[idx]
      if augment_images:
        x = augment(x, rng)
      x = normalize(x)
      if with_index:
        yield x, split.labels[idx], idx
      else:
        yield (x, split.labels[idx]) if labels else x


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def image_batches(images, batch_size: int) -> tuple[Iterator, int]:
  """``(batches, count)``: one pass over the normalized images of a split
  (``SplitLike``), labels dropped, or over an image array (NHWC, already
  normalized), in order."""
  if hasattr(images, "batches"):
    return ((x for x, _ in images.batches(batch_size)),
            num_batches(len(images), batch_size))
  images = np.asarray(images)
  return ((images[i:i + batch_size] for i in range(0, len(images), batch_size)),
          num_batches(len(images), batch_size))
