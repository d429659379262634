"""Write a synthetic ImageNet-R-shaped image folder: 200 wnid-like class folders of JPEGs.

Command:   python experiments/make_synthetic_image_folder.py /tmp/inr24k --num-images 24000
Layout:    ``<out>/n<8 digits>/<style>_<i>.jpg`` (ImageNet-R's raw layout, read by
           ``clx.data.images.load_image_dataset("imagenet_r", out)`` with InfLoRA's split).
Images:    RGB, sides drawn uniformly in [--min-side, --max-side] (ImageNet-R's images are
           mostly a few hundred pixels a side), a smooth random colour field plus noise (so the
           JPEG decoder does real work), JPEG quality 80. Seeded: the same arguments give the
           same files.
Cost:      measured on 2 shared Xeon cores (see experiments/BENCHMARKS.md, input pipeline):
           about 1-2 ms of CPU and ~10 kB of disk per image at the default sides.
Delete the folder afterwards (``rm -r <out>``); nothing in clx keeps it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import numpy as np

STYLES = ("art", "cartoon", "deviantart", "embroidery", "graffiti", "misc", "origami",
          "painting", "sculpture", "sketch", "tattoo", "toy")


def make_folder(out: str | os.PathLike, num_images: int = 24000, num_classes: int = 200,
                min_side: int = 64, max_side: int = 500, seed: int = 0, quality: int = 80) -> dict:
  """Write the folder; returns ``{"images", "bytes", "seconds"}``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if num_images < num_classes:
    raise ValueError(f"need at least one image per class: {num_images} < {num_classes}")
  if not 8 <= min_side <= max_side:
    raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} exists and is not empty; remove it or choose another folder")
  rng = np.random.default_rng(seed)
  wnids = sorted({f"n{v:08d}" for v in rng.choice(10 ** 8, num_classes, replace=False)})
  labels = np.arange(num_images) % num_classes
  start, total = time.perf_counter(), 0
  for wnid in wnids:
    (out / wnid).mkdir(parents=True)
  for i, label in enumerate(labels):
    h, w = rng.integers(min_side, max_side + 1, 2)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.BILINEAR), np.int16)
    noise = rng.integers(-24, 25, (int(h), int(w), 1), dtype=np.int16)
    pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
    path = out / wnids[label] / f"{STYLES[i % len(STYLES)]}_{i}.jpg"
    Image.fromarray(pixels).save(path, quality=quality)
    total += path.stat().st_size
  return {"images": num_images, "bytes": total, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out")
  parser.add_argument("--num-images", type=int, default=24000)
  parser.add_argument("--num-classes", type=int, default=200)
  parser.add_argument("--min-side", type=int, default=64)
  parser.add_argument("--max-side", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  stats = make_folder(args.out, args.num_images, args.num_classes, args.min_side, args.max_side,
                      args.seed)
  print(f"wrote {stats['images']} JPEGs, {stats['bytes'] / 2 ** 20:.1f} MiB, in "
        f"{stats['seconds']:.1f} s ({1e3 * stats['seconds'] / stats['images']:.2f} ms/image) "
        f"to {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
