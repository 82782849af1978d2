"""Fashion-MNIST loading: the sources in order, and one clear error for each kind
of missing or damaged data (fat/data.py)."""

import gzip
import os

import numpy as np
import pytest

from fat import data

FILES = [f for pair in data.FASHION_MNIST_FILES.values() for f in pair]


def _idx(arr: np.ndarray) -> bytes:
  """An idx file of unsigned bytes (magic 0 0 8 ndim, big-endian dims, data)."""
  head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  return head + arr.astype(np.uint8).tobytes()


def _write(folder, name: str, payload: bytes) -> None:
  with gzip.open(os.path.join(folder, name), "wb") as f:
    f.write(payload)


@pytest.fixture
def idx_dir(tmp_path):
  """Four small, valid idx files: 6 train and 4 test images of 28x28."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("test", 4)):
    images, labels = data.FASHION_MNIST_FILES[split]
    _write(tmp_path, images, _idx(rng.integers(0, 256, (n, 28, 28))))
    _write(tmp_path, labels, _idx(np.arange(n) % 10))
  return tmp_path


def test_data_dir_is_read_first(idx_dir):
  test = data.load("fashion_mnist", "test", str(idx_dir))
  assert test.images.shape == (4, 28, 28, 1) and test.images.dtype == np.uint8
  np.testing.assert_array_equal(test.labels, [0, 1, 2, 3])
  assert len(data.load("fashion_mnist", "train", str(idx_dir))) == 6


def test_data_dir_missing_a_file_is_named(idx_dir):
  os.remove(os.path.join(idx_dir, FILES[3]))
  with pytest.raises(data.DataError, match=f"missing .*{FILES[3]}.*leave data_dir empty"):
    data.load("fashion_mnist", "train", str(idx_dir))


def test_missing_data_dir_is_refused(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.load("fashion_mnist", "test", str(tmp_path / "nowhere"))


def test_corrupt_and_truncated_files_are_named(idx_dir):
  path = os.path.join(idx_dir, FILES[2])
  raw = bytearray(open(path, "rb").read())
  raw[20:60] = bytes(40)  # inside the deflate stream
  open(path, "wb").write(bytes(raw))
  with pytest.raises(data.DataError, match=f"cannot read .*{FILES[2]}.*Reinstall"):
    data.load("fashion_mnist", "test", str(idx_dir))
  _write(idx_dir, FILES[2], _idx(np.zeros((4, 28, 28)))[:-10])
  with pytest.raises(data.DataError, match="truncated"):
    data.load("fashion_mnist", "test", str(idx_dir))
  _write(idx_dir, FILES[2], b"\x00\x00\x0d\x03" + bytes(12))
  with pytest.raises(data.DataError, match="not an idx file"):
    data.load("fashion_mnist", "test", str(idx_dir))


def test_no_data_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def offline(*args, **kwargs):
    raise ConnectionError("no network")
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path))
  monkeypatch.setattr(tfds, "load", offline)
  with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
    data.load("fashion_mnist", "test")


def test_debian_folder_is_used_without_data_dir(idx_dir, monkeypatch):
  monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(idx_dir))
  assert len(data.load("fashion_mnist", "test")) == 4


def test_subset_is_fixed_by_the_seed(idx_dir):
  train = data.load("fashion_mnist", "train", str(idx_dir))
  a, b, c = (train.sample(0.5, s).labels for s in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert len(a) == 3 and not np.array_equal(a, c)
  with pytest.raises(data.DataError, match=r"\(0, 1\]"):
    train.sample(0.0, 0)


def test_augmentation_is_seeded(idx_dir):
  """Augmented batches repeat with the seed; augmentation without a seed is refused."""
  train = data.load("fashion_mnist", "train", str(idx_dir))
  a, b = ([x for x, _ in data.batches(train, 4, seed=3, augment_images=True)]
          for _ in range(2))
  assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
  with pytest.raises(ValueError, match="augment_images needs a seed"):
    next(data.batches(train, 4, augment_images=True))


def test_image_batches_of_a_split_and_of_an_array():
  split = data.Split(np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2, 1), np.arange(5))
  batches, count = data.image_batches(split, 2)
  got = list(batches)
  assert count == 3 and [len(x) for x in got] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(got), data.normalize(split.images))
  batches, count = data.image_batches(data.normalize(split.images), 4)
  got = list(batches)
  assert count == 2 and [len(x) for x in got] == [4, 1]
  np.testing.assert_array_equal(np.concatenate(got), data.normalize(split.images))


def test_distillation_splits_calibrate_on_the_first_unlabeled_images():
  split = data.Split(np.arange(40 * 4, dtype=np.uint8).reshape(40, 2, 2, 1), np.arange(40))
  unlabeled, calib = data.distillation_splits(split, train_fraction=0.5, calibration_images=8,
                                              seed=3)
  again, _ = data.distillation_splits(split, train_fraction=0.5, calibration_images=8, seed=3)
  other, _ = data.distillation_splits(split, train_fraction=0.5, calibration_images=8, seed=4)
  assert len(unlabeled) == 20 and len(calib) == 8
  np.testing.assert_array_equal(unlabeled.labels, again.labels)
  assert not np.array_equal(unlabeled.labels, other.labels)
  np.testing.assert_array_equal(calib.labels, unlabeled.labels[:8])
  np.testing.assert_array_equal(calib.images, unlabeled.images[:8])
