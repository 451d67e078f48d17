#!/usr/bin/env python
"""Classify images with a trained checkpoint: `python predict.py IMAGE_OR_FOLDER... [--top-k 3] [--json]`."""

from preactresnet.cli import main_predict

if __name__ == "__main__":
    main_predict()
