#!/usr/bin/env python
"""Evaluate a checkpoint on the CIFAR-10 test set: overall and per-class accuracy (issue: evaluation)."""

import sys

if __name__ == "__main__":
    print("test.py: evaluation of saved checkpoints is not built yet (see the evaluation issue); "
          "train.py already prints the final test accuracy and per-class accuracy", file=sys.stderr)
    raise SystemExit(1)
