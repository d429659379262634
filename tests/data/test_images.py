"""clx.data.images: image folders, split lists, the official splits and their errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from clx.data import images


def _write(path, h=12, w=10, seed=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(arr).save(path)


def _folder(root, counts, ext=".jpg"):
  for c, count in counts.items():
    for i in range(count):
      _write(root / c / f"img_{i}{ext}", seed=i)
  return root


# ------------------------------------------------------------ torch randperm


class _MT19937:
  """Textbook MT19937 (Matsumoto & Nishimura 1998, init_genrand), pure Python."""

  def __init__(self, seed):
    self.mt = [0] * 624
    self.mt[0] = seed & 0xffffffff
    for i in range(1, 624):
      self.mt[i] = (1812433253 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)) + i) & 0xffffffff
    self.i = 624

  def __call__(self):
    if self.i >= 624:
      for k in range(624):
        y = (self.mt[k] & 0x80000000) | (self.mt[(k + 1) % 624] & 0x7fffffff)
        self.mt[k] = self.mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908b0df if y & 1 else 0)
      self.i = 0
    y = self.mt[self.i]
    self.i += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9d2c5680
    y ^= (y << 15) & 0xefc60000
    return y ^ (y >> 18)


def test_reference_mt19937_is_the_standard_one():
  assert _MT19937(5489)() == 3499211612  # std::mt19937's documented first output


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 3), (700, 0), (1000, 1993)])
def test_torch_randperm_against_pure_python_reference(n, seed):
  mt = _MT19937(seed)
  ref = list(range(n))
  for i in range(n - 1):  # aten randperm_cpu, n < 2**32/20
    z = mt() % (n - i)
    ref[i], ref[i + z] = ref[i + z], ref[i]
  np.testing.assert_array_equal(images.torch_randperm(n, seed), ref)


def test_torch_randperm_known_torch_output():
  # torch.manual_seed(0); torch.randperm(10) -> tensor([4, 1, 7, 5, 3, 9, 0, 8, 6, 2]) (run in torch 2.13.0 CPU)
  np.testing.assert_array_equal(images.torch_randperm(10, 0), [4, 1, 7, 5, 3, 9, 0, 8, 6, 2])


def test_random_split_indices_partition():
  train, test = images.random_split_indices(30000, 0.8, 0)
  assert len(train) == 24000 and len(test) == 6000
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(30000))


# ------------------------------------------------------------ image folders


def test_image_folder_follows_torchvision_order(tmp_path):
  root = tmp_path / "data"
  _folder(root, {"b": 2, "a": 3, "c_10": 1, "c_9": 1})
  _write(root / "a" / "nested" / "z.png")
  (root / "a" / "notes.txt").write_text("not an image")
  _write(root / "a" / "UPPER.JPG")
  split = images.image_folder(root)
  assert split.classes == ("a", "b", "c_10", "c_9")
  rel = [os.path.relpath(p, root) for p in split.paths]
  # sorted(os.walk): the class dir's files, then subfolders; files sorted within each
  assert rel[:5] == ["a/UPPER.JPG", "a/img_0.jpg", "a/img_1.jpg", "a/img_2.jpg", "a/nested/z.png"]
  np.testing.assert_array_equal(split.labels, [0] * 5 + [1] * 2 + [2, 3])


def test_image_folder_errors(tmp_path):
  with pytest.raises(images.ImageDataMissingError, match="does not exist"):
    images.image_folder(tmp_path / "nope")
  (tmp_path / "empty_class").mkdir()
  _folder(tmp_path, {"full": 1})
  with pytest.raises(images.ImageDataMissingError, match="empty_class"):
    images.image_folder(tmp_path)


# ------------------------------------------------------------ split lists


def _list(path, data, targets):
  import yaml
  path.write_text(yaml.safe_dump({"data": data, "targets": targets}))
  return path


def test_read_split_list_and_resolve(tmp_path):
  root = tmp_path / "imagenet-r"
  _folder(root, {"n01": 2, "n02": 1})
  lst = _list(tmp_path / "train.yaml", ["data/imagenet-r/n02/img_0.jpg", "data/imagenet-r/n01/img_1.jpg"],
              [1, 0])
  data, targets = images.read_split_list(lst)
  assert data == ["data/imagenet-r/n02/img_0.jpg", "data/imagenet-r/n01/img_1.jpg"]
  np.testing.assert_array_equal(targets, [1, 0])
  split = images.split_list(lst, root)
  assert list(split.paths) == [str(root / "n02/img_0.jpg"), str(root / "n01/img_1.jpg")]
  assert images.resolve_list_paths(["x/y/z.jpg"], "/r", prefix="x")[0] == "/r/y/z.jpg"
  with pytest.raises(ValueError, match="data/<folder>"):
    images.resolve_list_paths(["n01/a.jpg"], root)


def test_split_list_errors(tmp_path):
  with pytest.raises(images.ImageDataMissingError, match="does not exist"):
    images.read_split_list(tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("data: [a.jpg]\n")
  with pytest.raises(ValueError, match="'data' and 'targets'"):
    images.read_split_list(bad)
  _list(bad, ["a.jpg", "b.jpg"], [0])
  with pytest.raises(ValueError, match="equal length"):
    images.read_split_list(bad)
  _list(bad, ["a.jpg"], [-1])
  with pytest.raises(ValueError, match="non-negative"):
    images.read_split_list(bad)
  lst = _list(tmp_path / "l.yaml", ["data/d/a/1.jpg", "data/d/a/2.jpg"], [0, 0])
  (tmp_path / "d" / "a").mkdir(parents=True)
  _write(tmp_path / "d" / "a" / "1.jpg")
  with pytest.raises(images.ImageDataMissingError, match=r"\(1 of 2\)[\s\S]*a/2.jpg"):
    images.split_list(lst, tmp_path / "d")


# ------------------------------------------------------------ datasets


def test_imagenet_r_inflora_split_is_torch_random_split(tmp_path):
  root = _folder(tmp_path / "imagenet-r", {"n0": 7, "n1": 5, "n2": 8})
  splits = images.load_image_dataset("imagenet_r", root)
  whole = images.image_folder(root)
  train_idx, test_idx = images.random_split_indices(20, 0.8, 0)
  assert len(splits["train"]) == 16 and len(splits["test"]) == 4
  np.testing.assert_array_equal(splits["train"].paths, whole.paths[train_idx])
  np.testing.assert_array_equal(splits["test"].labels, whole.labels[test_idx])
  other = images.load_image_dataset("imagenet_r", root, seed=1)
  assert not np.array_equal(other["train"].paths, splits["train"].paths)


def test_imagenet_r_pre_split_folders_and_coda_lists(tmp_path):
  root = tmp_path / "imagenet-r"
  _folder(root / "train", {"n0": 2, "n1": 2})
  _folder(root / "test", {"n1": 1})
  splits = images.load_image_dataset("imagenet_r", root)
  assert splits["test"].classes == ("n0", "n1") and list(splits["test"].labels) == [1]
  with pytest.raises(images.ImageDataMissingError,
                     match=r"imagenet-r_train.yaml[\s\S]*imagenet-r_test.yaml"):
    images.load_image_dataset("imagenet_r", root, split="coda", list_dir=tmp_path / "lists")


@pytest.mark.parametrize("name", ["imagenet_a", "cub"])
def test_train_test_layouts_name_missing_folders(tmp_path, name):
  _folder(tmp_path / "train", {"a": 1})
  with pytest.raises(images.ImageDataMissingError, match=r"test"):
    images.load_image_dataset(name, tmp_path)
  _folder(tmp_path / "test", {"a": 1})
  assert len(images.load_image_dataset(name, tmp_path)["test"]) == 1


def test_domainnet_lists(tmp_path):
  root = tmp_path / "domainnet"
  _folder(root / "clipart", {"apple": 2, "zebra": 1})
  lists = tmp_path / "splits"
  with pytest.raises(images.ImageDataMissingError,
                     match=r"domainnet_train.yaml[\s\S]*domainnet_test.yaml"):
    images.load_image_dataset("domainnet", root, list_dir=lists)
  lists.mkdir()
  _list(lists / "domainnet_train.yaml", ["data/domainnet/clipart/apple/img_0.jpg",
                                         "data/domainnet/clipart/zebra/img_0.jpg"], [0, 344])
  with pytest.raises(images.ImageDataMissingError, match=r"domainnet_test.yaml"):
    images.load_image_dataset("domainnet", root, list_dir=lists)
  _list(lists / "domainnet_test.yaml", ["data/domainnet/clipart/apple/img_1.jpg"], [0])
  splits = images.load_image_dataset("domainnet", root, list_dir=lists)
  np.testing.assert_array_equal(splits["train"].labels, [0, 344])
  assert splits["test"].paths[0] == str(root / "clipart/apple/img_1.jpg")


def test_imagenet_r_tfds_recovers_the_image_folder_order_and_labels(tmp_path, monkeypatch):
  # a stand-in for TFDS imagenet_r: shuffled records, ImageNet-1k labels, file_name = wnid/file
  root = _folder(tmp_path / "imagenet-r", {"n0200": 4, "n0100": 3, "n0300": 3})
  folder = images.image_folder(root)
  records = [{"image": np.asarray(Image.open(p)), "label": 900 + int(y),
              "file_name": os.path.relpath(p, root).encode()} for p, y in zip(folder.paths, folder.labels)]
  records = [records[i] for i in np.random.default_rng(0).permutation(len(records))]

  class Source(list):
    def __getitems__(self, idx):
      return [self[i] for i in idx]

  monkeypatch.setattr(images, "_tfds_source", lambda *a: Source(records))
  splits = images.imagenet_r_tfds(seed=0)
  ref = images.load_image_dataset("imagenet_r", root, seed=0)
  for s in ("train", "test"):
    np.testing.assert_array_equal(splits[s].labels, ref[s].labels)
    for i in range(len(ref[s])):
      np.testing.assert_array_equal(np.asarray(splits[s].load_image(i)), np.asarray(ref[s].load_image(i)))
  assert splits["train"].classes == ("n0100", "n0200", "n0300")
