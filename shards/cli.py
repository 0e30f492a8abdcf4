"""What every `python -m <package>` entry point shares: parse, log, run, and turn a user error
(bad path, bad value) into one `ERROR ...` line and exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def dispatch(parser: argparse.ArgumentParser, argv=None, user_errors: tuple = (FileNotFoundError, ValueError)) -> int:
    args = parser.parse_args(argv)
    quiet_rank = int(os.environ.get("RANK", "0")) != 0  # torchrun: one rank logs
    logging.basicConfig(
        level=logging.WARNING if quiet_rank else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.fn(args)
    except user_errors as e:
        print(f"ERROR {e}", file=sys.stderr)
        return 2
