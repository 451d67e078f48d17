#!/usr/bin/env python
"""Report this machine, time training steps for each candidate setting, save the fastest for train.py:
`python optimize_system.py [--model preactresnet18] [--batch-size 256] [--quick]`."""

from preactresnet.optimize import main

if __name__ == "__main__":
    main()
