"""Data loading: decoding a source into the uint8 cache, against loading that cache afterwards.

    python bench/data_load.py [--data-dir ../shared/data/cifar10-jpeg.tar.gz]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preactresnet.data import load_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz", help="the CIFAR-10 JPEG archive to decode and cache")
    ap.add_argument("--repeats", type=int, default=3, help="cached loads timed after the first; the best is printed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        ds = load_dataset("cifar10", args.data_dir, cache_dir=cache)
        first = time.perf_counter() - start
        cached = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_dataset("cifar10", args.data_dir, cache_dir=cache)
            cached.append(time.perf_counter() - start)
    print(ds.summary())
    print(f"first load (decode every image, write the cache): {first:6.2f} s")
    print(f"later loads (read and checksum the cache), best of {args.repeats}: {min(cached):6.2f} s  ({first / min(cached):.0f}x)")
    print(f"normalization from the training images: mean {ds.mean}, std {ds.std}")


if __name__ == "__main__":
    main()
