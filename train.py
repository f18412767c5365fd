"""Entry point for `accelerate launch train.py --config FILE [--set key=value ...]`."""

import sys

from sdlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
