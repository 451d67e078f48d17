#!/usr/bin/env python
"""Train a PreActResNet / ResNeXt-29 on CIFAR: `python train.py [--config configs/NAME.yaml] [--flag value ...]`."""

from preactresnet.cli import main_train

if __name__ == "__main__":
    main_train()
