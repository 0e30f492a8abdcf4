"""The command line every `python -m <package>` entry point uses (`App`).

A command is a configuration model (distill_core.config) and a function of it that returns the
command's one-line JSON summary (a dict, printed here) or an exit code. `App.main` parses,
sets up logging (one rank logs under torchrun), builds the configuration, runs the command, and
turns a user error (bad path, refused value) into one `ERROR ...` line and exit code 2 instead of
a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from .config import ConfigError, add_arguments, from_arguments
from .secrets import refuse_secrets_in

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError)


@dataclass
class Command:
    """`name`: one subcommand running `run(config)`; or, with `commands`, a group of subcommands."""

    name: str
    help: str
    config: type[BaseModel] | None = None
    run: Callable[[BaseModel], dict | tuple[dict, int] | int | None] | None = None
    description: str | None = None
    commands: list[Command] = field(default_factory=list)

    def add_to(self, sub) -> None:
        p = sub.add_parser(self.name, help=self.help, description=self.description or self.help)
        if self.commands:
            inner = p.add_subparsers(dest=f"{self.name}_command", required=True, metavar="COMMAND")
            for c in self.commands:
                c.add_to(inner)
            return
        add_arguments(p, self.config)
        p.set_defaults(_command=self)


def setup_logging() -> None:
    quiet_rank = int(os.environ.get("RANK", "0")) != 0  # torchrun: one rank logs
    logging.basicConfig(
        level=logging.WARNING if quiet_rank else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@dataclass
class App:
    """A package's command line: `python -m <package> COMMAND [flags]`."""

    prog: str
    description: str
    commands: list[Command]
    user_errors: tuple[type[BaseException], ...] = ()

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=self.prog, description=self.description)
        sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for c in self.commands:
            c.add_to(sub)
        return p

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Command, BaseModel]:
        """The command and its configuration; SystemExit on a bad flag, ConfigError on a refused value."""
        args = self.parser().parse_args(argv)
        return args._command, from_arguments(args._command.config, args)

    def main(self, argv: Sequence[str] | None = None) -> int:
        setup_logging()
        try:
            refuse_secrets_in(sys.argv[1:] if argv is None else argv)
            command, config = self.parse(argv)
            result = command.run(config)
        except (ConfigError, *USER_ERRORS, *self.user_errors) as e:
            message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # KeyError's str() is a repr
            if "Original Traceback" in message:  # re-raised from a data-loader worker: its own last line
                message = re.sub(r"^[A-Za-z_][\w.]*: ", "", message.strip().splitlines()[-1])  # minus the class
            print(f"ERROR {message}", file=sys.stderr)
            return 2
        code = 0
        if isinstance(result, tuple):  # (summary, exit code): a summary of a run that failed in part
            result, code = result
        if isinstance(result, dict):
            print(json.dumps(result), flush=True)
            return code
        return int(result or 0)


def parse_script_args(config: type[BaseModel], description: str, argv: Sequence[str] | None = None):
    """A script's (benchmark's) configuration from its command line, by the same rules as a command."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, config)
    try:
        return from_arguments(config, p.parse_args(argv))
    except ConfigError as e:
        p.error(str(e))
