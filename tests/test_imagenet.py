"""ImageNet input on tiny fake data: the image-folder and TFDS paths, and preprocessing."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fat import data, imagenet

from conftest import write_image_folder


def bounds(p: imagenet.Preprocess):
  lo = min((0 - m) / s for m, s in zip(p.mean, p.std))
  hi = max((255 - m) / s for m, s in zip(p.mean, p.std))
  return lo - 1e-5, hi + 1e-5


@pytest.mark.parametrize("preprocess", sorted(imagenet.PREPROCESS))
def test_image_folder_batches(tmp_path, preprocess):
  root = write_image_folder(tmp_path)
  split = data.load("imagenet_folder", "train", root, preprocess=preprocess, image_size=32)
  assert len(split) == 6
  np.testing.assert_array_equal(split.labels, [0, 0, 1, 1, 2, 2])
  batches = list(split.batches(4))
  assert [x.shape for x, _ in batches] == [(4, 32, 32, 3), (2, 32, 32, 3)]
  x = np.concatenate([b[0] for b in batches])
  assert x.dtype == np.float32
  lo, hi = bounds(imagenet.PREPROCESS[preprocess])
  assert lo <= x.min() and x.max() <= hi and x.std() > 0.1
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), split.labels)
  test = data.load("imagenet_folder", "test", root, preprocess=preprocess, image_size=32)
  assert len(test) == 6


def test_views_and_shuffling_are_deterministic(tmp_path):
  root = write_image_folder(tmp_path, per_class=4)
  split = data.load("imagenet_folder", "train", root, image_size=16)
  sub = split.sample(0.5, seed=3)
  assert len(sub) == 6 and len(sub.head(2)) == 2
  np.testing.assert_array_equal(sub.positions, split.sample(0.5, seed=3).positions)
  assert not np.array_equal(sub.positions, split.sample(0.5, seed=4).positions)
  ordered = np.concatenate([x for x, _ in sub.batches(6)])
  run = lambda: list(sub.batches(4, seed=1, epochs=2, drop_remainder=True, with_index=True))
  a, b = run(), run()
  assert len(a) == 2  # one full batch of 4 per epoch
  for (xa, ya, ia), (xb, _, ib) in zip(a, b):
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(xa, ordered[ia])   # the index names the example
    np.testing.assert_array_equal(ya, sub.labels[ia])
  assert not np.array_equal(a[0][2], a[1][2])  # epochs are reshuffled


def test_in_memory_and_streamed_splits_are_split_like(tmp_path):
  """Both kinds, and the views the jobs take of them, have what data.SplitLike names."""
  root = write_image_folder(tmp_path)
  streamed = data.load("imagenet_folder", "train", root, image_size=8)
  in_memory = data.Split(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4, dtype=np.int32))
  assert isinstance(streamed, imagenet.StreamSplit) and isinstance(in_memory, data.Split)
  for split in (streamed, in_memory):
    for view in (split, split.head(2), split.sample(0.5, seed=0)):
      assert isinstance(view, data.SplitLike), type(view)

  class NoSample:  # everything but sample(), which the main job takes of its train split
    labels = np.zeros(1, np.int32)
    __len__ = lambda self: 1
    head = lambda self, n: self
    batches = lambda self, batch_size, **kwargs: iter(())
  assert not isinstance(NoSample(), data.SplitLike)


def test_preprocessing_values_and_crop():
  # A uniform image maps to (v - mean) / std, whatever the crop and resize.
  p = imagenet.preprocess_for("tf_mnasnet", 24)
  img = np.full((50, 80, 3), 200, np.uint8)
  x = imagenet.preprocess_image(tf.io.encode_png(img), p).numpy()
  np.testing.assert_allclose(x, (200 - np.array(p.mean)) / np.array(p.std) * np.ones_like(x),
                             rtol=1e-5, atol=1e-5)
  # The crop is centered: only the middle columns (white) survive a 0.5 crop.
  img = np.zeros((40, 120, 3), np.uint8)
  img[:, 40:80] = 255
  p = imagenet.Preprocess(image_size=20, crop_fraction=0.5)
  x = imagenet.preprocess_image(tf.io.encode_png(img), p).numpy()
  np.testing.assert_allclose(x, 1.0, atol=1e-5)   # keras scaling: 255 -> 1
  # The MNASNet crop fraction depends on the size: 224/256 and 128/160.
  assert imagenet.preprocess_for("tf_mnasnet", 224).fraction == pytest.approx(0.875)
  assert imagenet.preprocess_for("tf_mnasnet", 128).fraction == pytest.approx(0.8)


def test_tfds_path_reads_mock_imagenet(tmp_path):
  with tfds.testing.mock_data(num_examples=5):
    split = data.load("imagenet2012", "test", str(tmp_path), preprocess="timm", image_size=24)
    assert len(split) == 5 and split.labels.dtype == np.int32
    # The labels TFDS itself reads, in file order.
    direct = tfds.load("imagenet2012", split="validation", data_dir=str(tmp_path),
                       shuffle_files=False)
    np.testing.assert_array_equal(split.labels, [int(ex["label"]) for ex in tfds.as_numpy(direct)])
    batches = list(split.batches(2, with_index=True))
    assert [x.shape for x, _, _ in batches] == [(2, 24, 24, 3)] * 2 + [(1, 24, 24, 3)]
    np.testing.assert_array_equal(np.concatenate([i for _, _, i in batches]), np.arange(5))
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches]), split.labels)
    x = np.concatenate([b[0] for b in batches])
    lo, hi = bounds(imagenet.PREPROCESS["timm"])
    assert x.dtype == np.float32 and lo <= x.min() and x.max() <= hi
    sub = split.sample(0.6, seed=0)
    got = np.concatenate([y for _, y in sub.batches(2, seed=5)])
    assert sorted(got) == sorted(sub.labels)


def test_missing_data_is_explained(tmp_path):
  with pytest.raises(data.DataError, match="tfds build imagenet2012"):
    data.load("imagenet2012", "test", str(tmp_path / "nothing"))
  with pytest.raises(data.DataError, match="does not exist"):
    data.load("imagenet_folder", "test", str(tmp_path / "nothing"))
  os.makedirs(tmp_path / "empty" / "validation" / "cls")
  with pytest.raises(data.DataError, match="holds no images"):
    data.load("imagenet_folder", "test", str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="config.preprocess"):
    imagenet.preprocess_for("caffe", 224)
