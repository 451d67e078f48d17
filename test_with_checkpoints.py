#!/usr/bin/env python
"""Evaluate saved checkpoints and tabulate them: `python test_with_checkpoints.py [PATHS...] [--sort epoch]`."""

from preactresnet.cli import main_checkpoints

if __name__ == "__main__":
    main_checkpoints()
