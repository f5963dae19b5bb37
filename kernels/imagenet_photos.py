"""JPEGs made from real photos at ImageNet's sizes, for ``train_imagenet.py --benchmark-data``.

    python kernels/imagenet_photos.py /tmp/photos --count 200 && python train_imagenet.py --benchmark-data /tmp/photos

The photos are scikit-image's colour sample photos (``skimage.data``: astronaut, chelsea, coffee, rocket,
motorcycle left/right; a benchmark-only dependency in requirements-test.txt). Each file is a random crop of
one (at least half its shorter side), resized to one of ImageNet's common sizes (500x375, 375x500, 500x333,
640x480, 500x500) and saved at JPEG quality 90 (4:2:0), seeded, so the same command writes the same files.
Real ImageNet JPEGs are larger on average (about 110 KB), so their decoding is slower than these files'.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (500, 500))


def write_photos(folder: Path, count: int, seed: int = 0, quality: int = 90) -> list[Path]:
    """``count`` JPEGs ``photo_0000.JPEG``... in ``folder``; needs scikit-image."""
    import skimage.data
    from PIL import Image
    rng = random.Random(seed)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
              *skimage.data.stereo_motorcycle()[:2]]
    sources = [Image.fromarray(pixels).convert("RGB") for pixels in photos]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        photo = sources[i % len(sources)]
        width, height = SIZES[rng.randrange(len(SIZES))]
        side = min(photo.size)
        w = rng.randint(side // 2, photo.width)
        h = min(photo.height, max(side // 2, round(w * height / width)))
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        image = photo.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
        path = folder / f"photo_{i:04d}.JPEG"
        image.save(path, "JPEG", quality=quality)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--quality", type=int, default=90)
    args = ap.parse_args(argv)
    try:
        files = write_photos(args.folder, args.count, quality=args.quality)
    except ImportError:
        print("error: scikit-image is not installed (pip install scikit-image)", file=sys.stderr)
        return 2
    print(f"{len(files)} JPEGs in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
