"""ImageNet input: TFDS ``imagenet2012`` or an image folder, read with tf.data.

Two sources, one pipeline:

* ``tfds``: TFDS ``imagenet2012`` prepared in ``data_dir`` (from the manually
  downloaded tars: ``tfds build imagenet2012 --manual_dir=... --data_dir=...``,
  or pass ``manual_dir`` and it is prepared on first use).
* ``folder``: ``root/<split>/<class_name>/*.JPEG`` (any image format
  ``tf.io.decode_image`` reads); classes are the sorted folder names. No
  TFDS preparation needed. Our "test" split reads ``validation`` (or ``val``).

Images are decoded, center-cropped and resized as the weight source was
trained (``PREPROCESS``), then normalized; the model sees float32 NHWC.
``StreamSplit`` is a ``fat.data.SplitLike``, as the in-memory
``fat.data.Split`` is: ``batches(...)`` yielding ``(x, y)`` or ``(x, y, index)``,
``head(n)``, ``sample(fraction, seed)`` and ``labels``. Views (head, sample)
keep positions into the base split, so they are exact and deterministic.

This module imports nothing from ``fat.data`` (which imports it): errors come
from ``fat.errors``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import numpy as np

from fat.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")
SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preprocess:
  """Eval-style preprocessing: center crop, resize, normalize ((x - mean) / std, x in [0, 255]).

  The crop side is ``crop_fraction * min(h, w)``, or, with ``crop_padding``,
  ``image_size / (image_size + crop_padding) * min(h, w)`` (TF's MNASNet
  input). ``order`` "crop_resize" crops the original image and resizes the
  crop (TF); "resize_crop" resizes the short side to ``image_size /
  fraction`` and then crops (timm/torchvision).
  """

  image_size: int = 224
  crop_fraction: float = 0.875
  crop_padding: int | None = None
  order: str = "crop_resize"
  resize: str = "bilinear"
  antialias: bool = False
  mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
  std: tuple[float, float, float] = (127.5, 127.5, 127.5)

  def __post_init__(self):
    if self.image_size <= 0:
      raise ValueError(f"image_size must be positive, got {self.image_size}.")
    if not 0.0 < self.crop_fraction <= 1.0:
      raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}.")
    if self.order not in ("crop_resize", "resize_crop"):
      raise ValueError(f"order must be 'crop_resize' or 'resize_crop', got {self.order!r}.")

  @property
  def fraction(self) -> float:
    if self.crop_padding is not None:
      return self.image_size / (self.image_size + self.crop_padding)
    return self.crop_fraction


def _scaled(values) -> tuple[float, float, float]:
  return tuple(255.0 * v for v in values)


# What each weight source was trained with.
PREPROCESS = {
    # keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1.
    "keras": Preprocess(resize="bilinear"),
    # timm mobilenetv2_100 / mnasnet_100: crop_pct 0.875, bicubic, ImageNet mean/std.
    "timm": Preprocess(order="resize_crop", resize="bicubic", antialias=True,
                       mean=_scaled(IMAGENET_MEAN), std=_scaled(IMAGENET_STD)),
    # tensorflow/tpu MNASNet: crop padding 32, bicubic, ImageNet mean/std (0-255).
    "tf_mnasnet": Preprocess(crop_padding=32, resize="bicubic",
                             mean=_scaled(IMAGENET_MEAN), std=_scaled(IMAGENET_STD)),
}


def preprocess_for(name: str, image_size: int) -> Preprocess:
  if name not in PREPROCESS:
    raise ValueError(f"config.preprocess must be one of {sorted(PREPROCESS)}, got {name!r}.")
  return dataclasses.replace(PREPROCESS[name], image_size=image_size)


def preprocess_image(encoded, p: Preprocess):
  """Encoded image bytes -> float32 (image_size, image_size, 3), normalized (tf ops)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  img = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  img = tf.cast(img, tf.float32)
  size = tf.constant(p.image_size, tf.int32)
  hw = tf.shape(img)[:2]
  short = tf.cast(tf.reduce_min(hw), tf.float32)
  if p.order == "resize_crop":
    scale = tf.cast(size, tf.float32) / p.fraction / short
    new_hw = tf.maximum(tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32), size)
    img = tf.image.resize(img, new_hw, method=p.resize, antialias=p.antialias)
    hw, crop = new_hw, size
  else:
    crop = tf.cast(p.fraction * short, tf.int32)
  top, left = (hw[0] - crop + 1) // 2, (hw[1] - crop + 1) // 2
  img = img[top:top + crop, left:left + crop]
  if p.order == "crop_resize":
    img = tf.image.resize(img, [p.image_size, p.image_size], method=p.resize,
                          antialias=p.antialias)
  img = tf.clip_by_value(img, 0.0, 255.0)
  return (img - tf.constant(p.mean)) / tf.constant(p.std)


# --------------------------------------------------------------------------
# Sources: a base split read in a fixed order, yielding (encoded, label, base index).
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderBase:
  """``root/<class>/<image>`` files, sorted; labels are sorted class-folder indices."""

  paths: np.ndarray
  labels: np.ndarray
  classes: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def records(self, positions: np.ndarray):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    ds = tf.data.Dataset.from_tensor_slices(
        (self.paths[positions], self.labels[positions], positions.astype(np.int64)))
    return ds.map(lambda p, y, i: (tf.io.read_file(p), y, i),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def folder_base(root: str, split: str) -> FolderBase:
  names = {"train": ("train",), "test": ("validation", "val")}[split]
  split_dir = next((os.path.join(root, n) for n in names
                    if os.path.isdir(os.path.join(root, n))), None)
  if split_dir is None:
    raise DataError(f"image folder {root!r} has no {' or '.join(names)} subfolder; lay it "
                    "out as <root>/{train,validation}/<class_name>/*.JPEG.")
  classes = tuple(sorted(d for d in os.listdir(split_dir)
                         if os.path.isdir(os.path.join(split_dir, d))))
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(split_dir, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(split_dir, cls, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise DataError(f"image folder {split_dir!r} holds no images ({IMAGE_EXTENSIONS}) in "
                    "class subfolders.")
  return FolderBase(np.array(paths), np.array(labels, np.int32), classes)


@dataclasses.dataclass(frozen=True)
class TFDSBase:
  """TFDS ``imagenet2012`` read in file order, images still encoded.

  ``size`` comes from the dataset info; labels are read (one pass over the
  records, images not decoded) only when asked for, or to count the records
  when the info has no size (``size=None``).
  """

  builder: object
  split: str
  size: int | None

  def __len__(self) -> int:
    return len(self.labels) if self.size is None else self.size

  @functools.cached_property
  def labels(self) -> np.ndarray:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    return np.array([int(ex["label"]) for ex in tfds.as_numpy(self._read())], np.int32)

  def records(self, positions: np.ndarray):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    member = np.full(len(self), False)
    member[positions] = True
    member = tf.constant(member)
    ds = self._read().enumerate()
    ds = ds.filter(lambda i, ex: tf.gather(member, i))
    return ds.map(lambda i, ex: (ex["image"], tf.cast(ex["label"], tf.int32), i))

  def _read(self):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    return self.builder.as_dataset(split=self.split, shuffle_files=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})


def tfds_base(split: str, data_dir: str | None, manual_dir: str | None = None) -> TFDSBase:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds_split = {"train": "train", "test": "validation"}[split]
  how = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into a folder and "
         "run `tfds build imagenet2012 --manual_dir=FOLDER --data_dir=DATA_DIR` (or set "
         "config.manual_dir to FOLDER), then set config.data_dir to DATA_DIR; or use "
         "config.dataset='imagenet_folder' with <root>/{train,validation}/<class>/*.JPEG.")
  try:
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    if manual_dir:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    splits = builder.info.splits
    # Info without split sizes (e.g. mocked data): the records are counted.
    size = int(splits[tfds_split].num_examples) if tfds_split in splits else None
    base = TFDSBase(builder, tfds_split, size)
    next(iter(base._read().take(1)), None)  # fails here, not mid-run, if unreadable
    n = len(base)
  except Exception as e:  # TFDS raises many types for absent or unprepared data
    raise DataError(f"TFDS imagenet2012 {tfds_split!r} cannot be read from data_dir "
                    f"{data_dir!r} ({type(e).__name__}: {e}). To get it: {how}") from e
  if not n:
    raise DataError(f"TFDS imagenet2012 {tfds_split!r} in {data_dir!r} is empty. {how}")
  return base


# --------------------------------------------------------------------------
# A view of a base split, with the batch interface of fat.data.Split.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """Examples ``positions`` of ``base``, preprocessed by ``preprocess``.

  ``index`` in ``batches(..., with_index=True)`` is the position within this
  view (0..len-1), for looking up per-example arrays such as teacher logits.
  """

  base: FolderBase | TFDSBase
  positions: np.ndarray
  preprocess: Preprocess

  def __len__(self) -> int:
    return len(self.positions)

  @property
  def labels(self) -> np.ndarray:
    return self.base.labels[self.positions]

  def head(self, n: int) -> "StreamSplit":
    return dataclasses.replace(self, positions=self.positions[:n])

  def sample(self, fraction: float, seed: int) -> "StreamSplit":
    """A uniform random ``fraction`` (at least one example), fixed by ``seed``, in base order."""
    if not 0.0 < fraction <= 1.0:
      raise DataError(f"subset fraction must be in (0, 1], got {fraction}.")
    n = max(1, int(round(len(self) * fraction)))
    keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
    return dataclasses.replace(self, positions=self.positions[keep])

  def batches(self, batch_size: int, *, seed: int | None = None, epochs: int = 1,
              drop_remainder: bool = False, augment_images: bool = False,
              with_index: bool = False) -> Iterator:
    """Normalized float32 batches; ``seed`` None keeps the order, else each epoch is shuffled.

    ``augment_images`` is refused: ImageNet here is only read for evaluation,
    calibration and threshold/QAT training with the source's eval preprocessing.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if batch_size <= 0:
      raise DataError(f"batch_size must be positive, got {batch_size}.")
    if augment_images:
      raise DataError("ImageNet batches have no augmentation; set augment=False.")
    view_index = np.full(int(self.positions.max(initial=-1)) + 1, -1, np.int64)
    view_index[self.positions] = np.arange(len(self))
    lookup = tf.constant(view_index)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
      if isinstance(self.base, FolderBase):
        order = rng.permutation(len(self)) if seed is not None else np.arange(len(self))
        ds = self.base.records(self.positions[order])
      else:
        ds = self.base.records(np.sort(self.positions))
        if seed is not None:
          ds = ds.shuffle(min(SHUFFLE_BUFFER, len(self)), seed=int(rng.integers(2**31)))
      p = self.preprocess
      ds = ds.map(lambda e, y, i: (preprocess_image(e, p), y, tf.gather(lookup, i)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)
      for x, y, i in ds.as_numpy_iterator():
        yield (x, y, i) if with_index else (x, y)


def load(source: str, split: str, data_dir: str | None, preprocess: Preprocess,
         manual_dir: str | None = None) -> StreamSplit:
  """ImageNet ``split`` ("train" or "test" = validation) from ``source`` "tfds" or "folder"."""
  if split not in ("train", "test"):
    raise DataError(f"split must be 'train' or 'test', got {split!r}.")
  if source == "folder":
    if not data_dir or not os.path.isdir(data_dir):
      raise DataError(f"image folder {data_dir!r} does not exist; set config.data_dir to "
                      "the root holding {train,validation}/<class_name>/*.JPEG.")
    base = folder_base(data_dir, split)
  elif source == "tfds":
    base = tfds_base(split, data_dir or None, manual_dir)
  else:
    raise DataError(f"ImageNet source must be 'tfds' or 'folder', got {source!r}.")
  return StreamSplit(base, np.arange(len(base)), preprocess)

