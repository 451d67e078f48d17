"""Build the bundled sample: a class-balanced, seeded subset of an image-tree archive, bytes unchanged.

    python -m preactresnet.data.sample ../shared/data/cifar10-jpeg.tar.gz

The package ships the result (preactresnet/data/cifar10_sample.tar.gz, 1,000 training and 200 test
images per class) so that the demo and the tests run on real CIFAR-10 images with no network.
"""

from __future__ import annotations

import argparse
import io
import random
import tarfile
from collections import defaultdict
from pathlib import Path

from .sources import SAMPLE_FILE
from .trees import _split_key


def build_sample(source: Path, out: Path, train_per_class: int = 1000, test_per_class: int = 200, seed: int = 0) -> int:
    """Copy a seeded subset of `source` (a train/ test/ tree archive) into the tar.gz `out`."""
    members: dict[tuple[str, str], list[tuple[str, bytes]]] = defaultdict(list)
    with tarfile.open(source, "r:*") as tar:
        for m in tar:
            key = _split_key(tuple(Path(m.name).parts)) if m.isfile() else None
            if key:
                members[key[:2]].append((key[2], tar.extractfile(m).read()))
    rng = random.Random(seed)
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz", compresslevel=9) as tar:
        for (split, cls) in sorted(members):
            files = sorted(members[(split, cls)])
            k = train_per_class if split == "train" else test_per_class
            if len(files) < k:
                raise SystemExit(f"error: {source} has only {len(files)} {split} images of '{cls}', need {k}")
            for name, data in sorted(rng.sample(files, k)):
                info = tarfile.TarInfo(f"{split}/{cls}/{name}")
                info.size = len(data)
                info.mtime = 0  # reproducible bytes: the same source always gives the same archive
                tar.addfile(info, io.BytesIO(data))
                count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="image-tree archive with train/<class>/ and test/<class>/")
    ap.add_argument("--out", type=Path, default=SAMPLE_FILE)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.source.is_file():
        raise SystemExit(f"error: {args.source} not found; pass the path of an image-tree archive")
    n = build_sample(args.source, args.out, args.train_per_class, args.test_per_class, args.seed)
    print(f"wrote {n} images to {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
