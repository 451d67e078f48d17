#!/usr/bin/env python
"""Evaluate a checkpoint on the CIFAR test set: `python test.py [--checkpoint PATH] [--tta flip] [--json]`."""

from preactresnet.cli import main_test

if __name__ == "__main__":
    main_test()
