"""clx.data.transforms against torchvision's documented algorithms (NumPy/PIL references)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from clx.data import transforms as T


def _image(h, w, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_rrc_box_distribution_when_never_rejected():
  # 1000x1000 image, scale <= 0.5: w, h <= sqrt(0.5e6·4/3) < 1000, so the first
  # attempt is always accepted and torchvision's draws are: area fraction ~ U(scale),
  # log(w/h) ~ U(log ratio), top ~ U{0..H-h}, left ~ U{0..W-w}.
  rng = np.random.default_rng(1)
  H = W = 1000
  scale, ratio = (0.08, 0.5), (3 / 4, 4 / 3)
  boxes = np.array([T.rrc_box(rng, H, W, scale, ratio) for _ in range(4000)], np.float64)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
  frac = h * w / (H * W)
  log_r = np.log(w / h)
  # uniform moments (rounding to integers moves them by < 1e-3)
  assert abs(frac.mean() - np.mean(scale)) < 0.01
  assert abs(frac.std() - (scale[1] - scale[0]) / math.sqrt(12)) < 0.01
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  assert abs(log_r.mean() - (lo + hi) / 2) < 0.01
  assert abs(log_r.std() - (hi - lo) / math.sqrt(12)) < 0.01
  assert frac.min() > scale[0] - 0.005 and frac.max() < scale[1] + 0.005
  # the offset is uniform over the free range: (top / (H - h)) ~ U(0, 1)
  u = top / (H - h)
  assert abs(u.mean() - 0.5) < 0.02 and abs(u.std() - 1 / math.sqrt(12)) < 0.02


def _reference_fallback(height, width, ratio):
  # torchvision RandomResizedCrop.get_params, fallback branch, written from its docs
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10), (7, 9)])
def test_rrc_box_falls_back_to_the_clamped_centre_crop(height, width):
  # scale (0.99, 1) on an extreme aspect ratio cannot fit a crop of ratio 3/4..4/3;
  # on 7x9 the whole image (ratio 1.29, inside the range) is the fallback.
  rng = np.random.default_rng(0)
  scale = (0.99, 1.0) if height != 7 else (1.0, 1.0)
  box = T.rrc_box(rng, height, width, scale, (3 / 4, 4 / 3))
  if height == 7:  # an attempt may be accepted: area 63 up to rounding; else the whole image
    top, left, h, w = box
    assert 0 <= top and top + h <= 7 and 0 <= left and left + w <= 9
    assert abs(h * w - 63) <= h + w or box == (0, 0, 7, 9)
  else:
    assert box == _reference_fallback(height, width, (3 / 4, 4 / 3))


def test_resized_crop_is_crop_then_resize():
  img = _image(50, 70)
  arr = np.asarray(img)
  box = (5, 11, 20, 30)
  out = T.resized_crop(img, box, (20, 30))  # same size: the crop itself
  np.testing.assert_array_equal(np.asarray(out), arr[5:25, 11:41])
  big = np.asarray(T.resized_crop(img, box, (40, 60), "nearest"))
  np.testing.assert_array_equal(big, np.repeat(np.repeat(arr[5:25, 11:41], 2, 0), 2, 1))


@pytest.mark.parametrize("h,w", [(300, 500), (500, 300), (256, 999), (123, 123), (31, 32)])
def test_resize_shorter_size_matches_torchvision_formula(h, w):
  new_h, new_w = T.resize_shorter_size(h, w, 256)
  if w <= h:
    assert new_w == 256 and new_h == int(256 * h / w)
  else:
    assert new_h == 256 and new_w == int(256 * w / h)
  out = T.resize_shorter(_image(h, w), 256)
  assert out.size == (new_w, new_h)


@pytest.mark.parametrize("h,w", [(256, 300), (257, 341), (260, 260), (225, 224)])
def test_center_crop_offsets_round_half_even(h, w):
  arr = np.asarray(_image(h, w))
  out = np.asarray(T.center_crop(Image.fromarray(arr), (224, 224)))
  top, left = round((h - 224) / 2), round((w - 224) / 2)  # Python round: half to even
  np.testing.assert_array_equal(out, arr[top:top + 224, left:left + 224])


def test_center_crop_pads_small_images_with_zeros():
  arr = np.asarray(_image(10, 12))
  out = np.asarray(T.center_crop(Image.fromarray(arr), (14, 12)))
  assert out.shape == (14, 12, 3)
  np.testing.assert_array_equal(out[2:12], arr)
  assert not out[:2].any() and not out[12:].any()


def test_hflip_mirrors_with_probability_p():
  img = _image(8, 9)
  rng = np.random.default_rng(3)
  flips = 0
  for _ in range(2000):
    out = np.asarray(T.hflip(img, rng, 0.5))
    if not np.array_equal(out, np.asarray(img)):
      np.testing.assert_array_equal(out, np.asarray(img)[:, ::-1])
      flips += 1
  assert abs(flips / 2000 - 0.5) < 0.05


def test_normalize_batch_against_float64():
  x = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
  ref = x.astype(np.float64)
  np.testing.assert_allclose(T.normalize_batch(x, "0,1"), ref / 255, atol=1e-7)
  np.testing.assert_allclose(T.normalize_batch(x, "-1,1"), ref / 127.5 - 1, atol=1e-6)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  np.testing.assert_allclose(T.normalize_batch(x, mean=mean, std=std),
                             (ref / 255 - np.array(mean)) / np.array(std), atol=1e-5)
  with pytest.raises(ValueError, match="pixel_range"):
    T.normalize_batch(x, "0,255")
  with pytest.raises(ValueError, match="uint8"):
    T.normalize_batch(x.astype(np.float32))


def test_example_rng_is_keyed_by_seed_task_epoch_index():
  draw = lambda *k: T.example_rng(*k).integers(0, 2 ** 62)
  assert draw(0, 1, 2, 3) == draw(0, 1, 2, 3)
  values = {draw(*k) for k in [(0, 1, 2, 3), (1, 1, 2, 3), (0, 0, 2, 3), (0, 1, 0, 3), (0, 1, 2, 4)]}
  assert len(values) == 5
  with pytest.raises(ValueError, match="epoch"):
    T.example_rng(0, 0, -1, 0)


def test_named_transforms_shapes_and_determinism():
  img = _image(333, 500)
  for name, t in T.TRANSFORMS.items():
    out = t(img, np.random.default_rng(0))
    again = t(img, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)
    assert out.dtype == np.uint8
    if t.kind == "resize_shorter":
      assert out.shape == (224, 336, 3)
    else:
      assert out.shape == (224, 224, 3), name
  # the official test transform: Resize(256) then CenterCrop(224), bilinear
  test = T.get_transform("resize256_center224")(img)
  resized = img.resize((384, 256), Image.BILINEAR)  # 500·256/333 = 384.3 -> 384
  np.testing.assert_array_equal(test, np.asarray(resized)[16:240, 80:304])
  with pytest.raises(ValueError, match="needs an rng"):
    T.get_transform("rrc224_flip")(img)
  with pytest.raises(KeyError, match="unknown image transform"):
    T.get_transform("random_crop")


def test_official_transforms_per_dataset_are_named_transforms():
  for dataset, (train, test) in T.OFFICIAL_TRANSFORMS.items():
    assert T.get_transform(train).random and not T.get_transform(test).random, dataset
  assert T.get_transform(T.OFFICIAL_TRANSFORMS["cub"][0]).scale == (0.05, 1.0)
  assert T.get_transform(T.OFFICIAL_TRANSFORMS["cub"][1]).interpolation == "bicubic"
