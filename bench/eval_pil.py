"""The shipped (or any pretrained) weights scored without this package's data path or evaluation code.

    python bench/eval_pil.py [--data-dir ../shared/data/cifar10-jpeg.tar.gz] [--weights preactresnet/weights/...]

It reads the test JPEGs from the archive with PIL, normalizes them with the mean and std in config.json, builds
the network from the model class alone (PreActResNet with the config's model_args, no factory, no loader) and
loads model.safetensors with safetensors itself; fp32 on the CPU, no TTA. Its figure should equal the
test_accuracy that export.py recorded in config.json (printed beside it).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preactresnet.models.preact_resnet import PreActResNet  # noqa: E402  (the network class only)

DEPTHS = {"preactresnet18": (2, 2, 2, 2), "preactresnet34": (3, 4, 6, 3)}


def test_images(archive: Path, classes: list[str]):
    """(images as float arrays HWC in [0, 1], labels) of the archive's test/<class>/*.jpg, read with PIL."""
    images, labels = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "test" and parts[1] in classes:
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
                labels.append(classes.index(parts[1]))
    return np.stack(images), np.array(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz", help="the CIFAR-10 JPEG archive")
    ap.add_argument("--weights", default=str(ROOT / "preactresnet/weights/preactresnet18_cifar10_cpu"),
                    help="a pretrained folder (model.safetensors, config.json)")
    ap.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    args = ap.parse_args()
    folder = Path(args.weights)
    config = json.loads((folder / "config.json").read_text())
    net = PreActResNet(block="basic", layers=DEPTHS[config["model"]], **config["model_args"])
    net.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
    net.eval()
    images, labels = test_images(Path(args.data_dir), config["classes"])
    mean, std = np.array(config["mean"], np.float32), np.array(config["std"], np.float32)
    x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        pred = torch.cat([net(x[i:i + args.batch_size]).argmax(1) for i in range(0, len(x), args.batch_size)])
    correct = int((pred.numpy() == labels).sum())
    print(f"{folder.name}: {100 * correct / len(labels):.2f}% ({correct}/{len(labels)} test images, PIL, fp32, no TTA); "
          f"config.json records {config['test_accuracy']:.2f}%")


if __name__ == "__main__":
    main()
