#!/usr/bin/env python
"""Report this machine, time training steps for each candidate setting, save the fastest for train.py:
`python optimize_system.py [--model preactresnet18] [--batch-size 256] [--quick]`."""

from preactresnet.cli import main_optimize as main

if __name__ == "__main__":
    main()
