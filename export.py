#!/usr/bin/env python
"""Export a checkpoint as a pretrained folder, optionally pushed to the Hugging Face Hub:
`python export.py [--checkpoint PATH] [--out pretrained/NAME] [--push-to-hub OWNER/NAME]`."""

from preactresnet.cli import main_export

if __name__ == "__main__":
    main_export()
