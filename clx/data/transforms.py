"""Image transforms of the official continual-learning code, in NumPy/PIL, seeded per example.

The official InfLoRA / CODA-Prompt pipelines are torchvision transforms on PIL
images. This module re-implements the ones they use, from torchvision's
documented algorithms (torch is not a dependency), on ``PIL.Image`` inputs:

  RandomResizedCrop(size, scale, ratio)   :func:`rrc_box` + :func:`resized_crop`
  RandomHorizontalFlip(p)                 :func:`hflip`
  Resize(int)  (shorter side)             :func:`resize_shorter`
  Resize((h, w))                          ``image.resize((w, h), interpolation)``
  CenterCrop(size)                        :func:`center_crop`
  ToTensor (+ Normalize)                  :func:`normalize_batch`

Randomness never comes from a global RNG: every random transform takes a
``numpy.random.Generator``, and :func:`example_rng` derives one per example
from ``(seed, task, epoch, index)``; so the augmented batches do not depend
on batch composition, worker or process count, and are the same after a
resume at a task boundary. torch's own random draws (``torch.empty(1).uniform_``
in DataLoader workers seeded from a non-deterministic base seed) cannot be
matched draw for draw; what is reproduced is the sampling *procedure*, so the
crop boxes have torchvision's distribution.

Named transforms (``TRANSFORMS``, used by configs):

  ``rrc224_flip``          RandomResizedCrop(224) [scale (0.08, 1), ratio (3/4, 4/3),
                           bilinear] + RandomHorizontalFlip(0.5): InfLoRA's train
                           transform for CIFAR-100, ImageNet-R, DomainNet
                           (``utils/data.py``; also its Gram/representation passes,
                           which iterate the training loader).
  ``rrc224_s005_flip``     the same with scale (0.05, 1): InfLoRA's CUB-200 and
                           ImageNet-A train transform.
  ``resize256_center224``  Resize(256) [bilinear] + CenterCrop(224): InfLoRA's
                           ImageNet-R / DomainNet test transform.
  ``resize256bicubic_center224``  Resize(256, interpolation=3 = bicubic) +
                           CenterCrop(224): InfLoRA's CUB-200 / ImageNet-A test.
  ``resize224``            Resize(224) [shorter side, bilinear]: InfLoRA's CIFAR test
                           transform (32x32 -> 224x224).
  ``square224``            Resize((224, 224)) bilinear, no crop: clx's previous
                           behaviour, kept for comparison.

All of them end with ``ToTensor`` in the official code (pixels / 255 in [0, 1])
and InfLoRA's ``Normalize(0, 1)`` is the identity; see :func:`normalize_batch`
for the ``"0,1"`` / ``"-1,1"`` / mean-std choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

# Tags keep the streams of different purposes apart (same seed, task, epoch).
SHUFFLE_TAG = 0x5348
AUGMENT_TAG = 0x4155

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def _pil_filter(name: str):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if name not in _INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {name!r}")
  return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
          "lanczos": Image.LANCZOS}[name]


def _check_nonneg_int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
  return int(value)


def example_rng(seed: int, task: int, epoch: int, index: int) -> np.random.Generator:
  """The augmentation RNG of one example: ``PCG64(SeedSequence([tag, seed, task, epoch, index]))``.

  Args:
    seed: run seed (non-negative).
    task: task id.
    epoch: pass over the task's data (training epochs 0..E-1; a representation
      pass that iterates the training loader, as InfLoRA's Gram passes, is one
      more pass and takes its own number, e.g. E and E+1).
    index: the example's index in its task split (stable under shuffling and sharding).

  Returns:
    A fresh ``numpy.random.Generator``.
  """
  for value, what in ((seed, "seed"), (task, "task"), (epoch, "epoch")):
    _check_nonneg_int(value, what)
  return keyed_rng((seed, task, epoch), index)


def keyed_rng(key: Sequence[int], index: int) -> np.random.Generator:
  """The augmentation RNG of example ``index`` of a pass keyed by ``key``.

  ``PCG64(SeedSequence([AUGMENT_TAG, *key, index]))``; :func:`example_rng` is
  the key ``(seed, task, epoch)``. The training loop keys its passes by its
  own seed words (``(seed, task, phase, epoch)`` for a training epoch), so an
  example's augmentation depends on the pass and the example only, never on
  the batch it lands in, the process or the thread that decodes it.

  Args:
    key: non-negative integers naming the pass.
    index: the example's index in its split (non-negative).

  Returns:
    A fresh ``numpy.random.Generator``.
  """
  words = [AUGMENT_TAG] + [_check_nonneg_int(v, "key word") for v in key]
  words.append(_check_nonneg_int(index, "index"))
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def rrc_box(rng: np.random.Generator, height: int, width: int,
            scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: the crop box ``(top, left, h, w)``.

  Up to 10 attempts: area fraction ``s ~ U(scale)``, ``log r ~ U(log ratio)``,
  ``w = round(sqrt(s·H·W·r))``, ``h = round(sqrt(s·H·W / r))``; accept when
  ``0 < w <= W`` and ``0 < h <= H``, then ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``.
  Otherwise a centred crop of the whole image clamped to the ratio range.

  Args:
    rng: NumPy generator.
    height, width: image size ``H, W``.
    scale: range of the crop area as a fraction of ``H·W``.
    ratio: range of the crop aspect ratio ``w / h``.

  Returns:
    ``(top, left, h, w)`` integers with the box inside the image.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got "
                     f"scale={scale}, ratio={ratio}")
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image, box: tuple[int, int, int, int], size: tuple[int, int],
                 interpolation: str = "bilinear"):
  """Crop ``box = (top, left, h, w)`` then resize to ``size = (height, width)`` (torchvision order).

  Cropping first (not ``resize(box=...)``) matters at the borders: the filter
  sees only the crop's pixels, as in ``torchvision.transforms.functional.resized_crop``.
  """
  top, left, h, w = box
  return image.crop((left, top, left + w, top + h)).resize((size[1], size[0]), _pil_filter(interpolation))


def hflip(image, rng: np.random.Generator, p: float = 0.5):
  """torchvision ``RandomHorizontalFlip(p)``: mirror when ``U(0,1) < p``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if rng.uniform() < p:
    return image.transpose(Image.FLIP_LEFT_RIGHT)
  return image


def resize_shorter_size(height: int, width: int, size: int) -> tuple[int, int]:
  """torchvision ``Resize(int)`` output ``(h, w)``: shorter side -> ``size``, longer side ->
  ``int(size · long / short)`` (truncated, as torchvision)."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_shorter(image, size: int, interpolation: str = "bilinear"):
  """torchvision ``Resize(size: int)`` on a PIL image."""
  width, height = image.size
  new_h, new_w = resize_shorter_size(height, width, size)
  if (new_h, new_w) == (height, width):
    return image
  return image.resize((new_w, new_h), _pil_filter(interpolation))


def center_crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
  """torchvision ``CenterCrop``: ``(top, left) = (round((H-h)/2), round((W-w)/2))``
  with Python's round-half-to-even."""
  return int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))


def center_crop(image, size: tuple[int, int]):
  """torchvision ``CenterCrop(size)`` on a PIL image (zero-padded when the image is smaller)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  width, height = image.size
  if size[0] > height or size[1] > width:  # torchvision pads with 0, centred, then crops
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    canvas = Image.new(image.mode, (width + pad_w, height + pad_h))
    canvas.paste(image, (pad_w // 2, pad_h // 2))
    image, (width, height) = canvas, canvas.size
  top, left = center_crop_box(height, width, size)
  return image.crop((left, top, left + size[1], top + size[0]))


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """A named torchvision-like pipeline, applied to one RGB ``PIL.Image``.

  Attributes:
    name: the registry name.
    kind: ``"random_resized_crop"``, ``"resize_center_crop"``, ``"resize_shorter"``
      or ``"resize_square"``.
    size: output side (square outputs, as every official config).
    resize: shorter-side size before the centre crop (``resize_center_crop``).
    scale, ratio: RandomResizedCrop ranges.
    flip: probability of a horizontal flip (0 for test transforms).
    interpolation: PIL filter name.
  """

  name: str
  kind: str
  size: int = 224
  resize: int = 256
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: float = 0.0
  interpolation: str = "bilinear"

  @property
  def random(self) -> bool:
    """Whether the transform draws random numbers (needs an RNG per example)."""
    return self.kind == "random_resized_crop" or self.flip > 0

  def __call__(self, image, rng: np.random.Generator | None = None) -> np.ndarray:
    """Args: image: RGB PIL image; rng: per-example generator (required when ``random``).

    Returns: uint8 array (size, size, 3) for the crop kinds; (h, w, 3) for ``resize_shorter``.
    """
    if self.random and rng is None:
      raise ValueError(f"transform {self.name!r} is random and needs an rng")
    out_size = (self.size, self.size)
    if self.kind == "random_resized_crop":
      box = rrc_box(rng, image.size[1], image.size[0], self.scale, self.ratio)
      image = resized_crop(image, box, out_size, self.interpolation)
    elif self.kind == "resize_center_crop":
      image = center_crop(resize_shorter(image, self.resize, self.interpolation), out_size)
    elif self.kind == "resize_shorter":
      image = resize_shorter(image, self.size, self.interpolation)
    elif self.kind == "resize_square":
      image = image.resize((self.size, self.size), _pil_filter(self.interpolation))
    else:
      raise ValueError(f"unknown transform kind {self.kind!r}")
    if self.flip > 0:
      image = hflip(image, rng, self.flip)
    return np.asarray(image, dtype=np.uint8)


TRANSFORMS: dict[str, ImageTransform] = {t.name: t for t in (
    ImageTransform("rrc224_flip", "random_resized_crop", scale=(0.08, 1.0), flip=0.5),
    ImageTransform("rrc224_s005_flip", "random_resized_crop", scale=(0.05, 1.0), flip=0.5),
    ImageTransform("resize256_center224", "resize_center_crop", resize=256),
    ImageTransform("resize256bicubic_center224", "resize_center_crop", resize=256,
                   interpolation="bicubic"),
    ImageTransform("resize224", "resize_shorter", size=224),
    ImageTransform("square224", "resize_square", size=224),
)}


# InfLoRA (liangyanshuo/InfLoRA utils/data.py) per dataset: (train, test). The train
# transform also feeds its Gram / representation passes (they iterate train_loader).
OFFICIAL_TRANSFORMS: dict[str, tuple[str, str]] = {
    "cifar100": ("rrc224_flip", "resize224"),                           # iCIFAR100
    "imagenet_r": ("rrc224_flip", "resize256_center224"),               # iIMAGENET_R
    "domainnet": ("rrc224_flip", "resize256_center224"),                # iDomainNet
    "imagenet_a": ("rrc224_s005_flip", "resize256bicubic_center224"),   # iIMAGENET_A
    "cub": ("rrc224_s005_flip", "resize256bicubic_center224"),          # iCUB
}


def get_transform(transform: str | ImageTransform) -> ImageTransform:
  """A transform by name (``TRANSFORMS``) or an ``ImageTransform`` passed through."""
  if isinstance(transform, ImageTransform):
    return transform
  if transform not in TRANSFORMS:
    raise KeyError(f"unknown image transform {transform!r}; known: {sorted(TRANSFORMS)}")
  return TRANSFORMS[transform]


PIXEL_RANGES = ("0,1", "-1,1")


def normalize_batch(images: np.ndarray, pixel_range: str = "0,1",
                    mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> np.ndarray:
  """uint8 pixels -> float32, per batch (never a float copy of a whole split).

  ``"0,1"``: ``x / 255`` (``ToTensor``; InfLoRA's ``Normalize(0, 1)`` is the
  identity). ``"-1,1"``: ``x / 127.5 - 1`` (the AugReg in21k checkpoints'
  normalisation, ``Normalize(0.5, 0.5)``). With ``mean``/``std`` (per channel,
  in [0, 1] units): ``(x / 255 - mean) / std`` after the range is ignored.

  Args:
    images: uint8 (B, H, W, C).
    pixel_range: ``"0,1"`` or ``"-1,1"``.
    mean, std: optional per-channel normalisation (both or neither).

  Returns:
    float32 (B, H, W, C).
  """
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std, or neither")
  x = np.asarray(images)
  if x.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {x.dtype}")
  if mean is not None:
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)
    if np.any(std32 <= 0):
      raise ValueError(f"std must be positive, got {std}")
    return (x.astype(np.float32) / np.float32(255.0) - mean32) / std32
  if pixel_range == "0,1":
    return x.astype(np.float32) / np.float32(255.0)
  if pixel_range == "-1,1":
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {pixel_range!r}")
