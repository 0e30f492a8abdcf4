"""python -m distill_demo [--out runs/demo] [--seeds 3] ..."""

from __future__ import annotations

import sys

from distill_core import App

from .demo import COMMAND

APP = App("python -m distill_demo", "The end-to-end demo.", [COMMAND])

if __name__ == "__main__":
    sys.exit(APP.main(["demo", *sys.argv[1:]]))
