"""One way to configure every command: a pydantic model is a command's configuration, and its fields,
with their descriptions, are the command's flags.

    class BuildConfig(BaseModel):
        out: Path = Field(description="output directory")
        shard_size: int = Field(1000, ge=1, description="samples per shard")

gives `--out OUT` (required) and `--shard-size SHARD_SIZE` (default 1000). Types map to argparse:
`bool` -> `--flag/--no-flag`, `Literal[...]` -> choices, `dict` -> a JSON object, `list[X]` -> one or
more values, `X | None` -> X.
A field annotated with `Positional()` is a positional argument. A nested model annotated with
`Nested(prefix)` contributes its own fields with that flag prefix, as an argument group: one
`TeacherSettings` gives `--checkpoint` in precompute and the service and `--teacher-checkpoint` in
the trainer.

Only the flags given on the command line reach the model (argparse.SUPPRESS defaults), so the
model decides everything else: its defaults, its validators and, for a pydantic-settings model,
its environment variables (the service's DISTILL_*). Every field must have a description: that is
the flag's help, and a field without one is refused when the parser is built.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

SEP = "__"  # argparse dest of a nested field: teacher__checkpoint


@dataclass(frozen=True)
class Positional:
    """Field metadata: a positional argument instead of a flag."""


@dataclass(frozen=True)
class NotAFlag:
    """Field metadata: never on the command line (a secret: `ps` shows every process's arguments).
    It comes from the environment (a pydantic-settings model) or from code."""


@dataclass(frozen=True)
class Nested:
    """Field metadata for a nested model: its fields become flags named `--{prefix}{field}`."""

    prefix: str = ""
    title: str | None = None


class ConfigError(ValueError):
    """A value given on the command line (or in the environment) that the configuration refuses."""


def read_secret(path: str | Path, flag: str) -> str:
    """A secret (a bearer token) from a file, for a `--*-file` flag: never passed as a flag itself."""
    secret = Path(path).read_text().strip()
    if not secret:
        raise ValueError(f"{flag} {path} is empty")
    return secret


def _strip_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            annotation = rest[0]
    if typing.get_origin(annotation) is typing.Annotated:  # X | None of an Annotated X: its type
        annotation = typing.get_args(annotation)[0]
    return annotation


def json_object(text: str) -> dict:
    """argparse type of a dict field: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _default_text(f: FieldInfo) -> str:
    if f.is_required():
        return ""
    value = f.get_default(call_default_factory=True)
    if value is None or value == "" or value == {}:
        return ""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, dict):
        value = json.dumps(value)
    elif isinstance(value, list):
        value = " ".join(map(str, value))
    return f" (default: {value})"


def _walk(model: type[BaseModel], prefix: str = "", dest: str = "", title: str | None = None):
    """(field, flag name, argparse dest, group title) of every leaf field, nested models flattened."""
    for name, f in model.model_fields.items():
        nested = next((m for m in f.metadata if isinstance(m, Nested)), None)
        if nested is not None:
            sub = _strip_optional(f.annotation)
            yield from _walk(sub, prefix + nested.prefix, dest + name + SEP, nested.title or name)
            continue
        if any(isinstance(m, NotAFlag) for m in f.metadata):
            continue
        yield f, prefix + name.replace("_", "-"), dest + name, title


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> argparse.ArgumentParser:
    """Add one argument per field of `model` (and of its nested models) to `parser`."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, flag, dest, title in _walk(model):
        if not f.description:
            raise TypeError(f"{model.__name__}: field {dest!r} has no description (it is the flag's help)")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        kind = _strip_optional(f.annotation)
        kw: dict = {"help": f.description + _default_text(f), "default": argparse.SUPPRESS}
        many = typing.get_origin(kind) is list
        if many:  # list[X]: one or more values
            kind = typing.get_args(kind)[0]
            kw["nargs"] = "+"
        if any(isinstance(m, Positional) for m in f.metadata):
            if not f.is_required() and not many:
                kw["nargs"] = "?"
            target.add_argument(dest, metavar=flag.upper().replace("-", "_"), type=_scalar(kind), **kw)
            continue
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            kw.update(choices=choices, type=type(choices[0]), metavar="{" + ",".join(map(str, choices)) + "}")
        else:
            kw.update(type=_scalar(kind), metavar=flag.upper().replace("-", "_"))
        target.add_argument("--" + flag, dest=dest, required=f.is_required(), **kw)
    return parser


def to_argv(config: BaseModel) -> list[str]:
    """The command line that gives `config`: its positional fields, then a flag for each field set
    explicitly (nested models too), in field order. The inverse of `from_arguments`, so that code
    that starts a command (the demo, the tests, the benchmarks) builds its arguments from the
    command's own configuration model. Secrets (`NotAFlag`) are never written."""
    positional: list[str] = []
    flags: list[str] = []
    for f, flag, dest, _ in _walk(type(config)):
        *parents, leaf = dest.split(SEP)
        node = config
        for p in parents:
            node = getattr(node, p) if p in node.model_fields_set else None
            if node is None:
                break
        if node is None or leaf not in node.model_fields_set:
            continue
        value = getattr(node, leaf)
        if value is None:
            continue  # the default of every optional field: nothing to say
        if any(isinstance(m, Positional) for m in f.metadata):
            positional += [_text(v) for v in value] if isinstance(value, list) else [_text(value)]
        elif isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            flags += [f"--{flag}", *map(_text, value)]
        else:
            flags += [f"--{flag}", _text(value)]
    return positional + flags


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _scalar(kind):
    if kind is dict or typing.get_origin(kind) is dict:
        return json_object
    if kind in (int, float, str, Path):
        return kind
    raise TypeError(f"no command-line form for fields of type {kind!r}")


def from_arguments(model: type[BaseModel], args: argparse.Namespace):
    """The model from the flags that were given; a refused value raises ConfigError naming its flag."""
    given = vars(args)
    data: dict = {}
    flags = {}
    for _, flag, dest, _ in _walk(model):
        flags[tuple(dest.split(SEP))] = flag
        if dest in given:
            *parents, leaf = dest.split(SEP)
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = given[dest]
    try:
        return model(**data)
    except ValidationError as e:
        raise ConfigError(_explain(e, flags)) from None


def _explain(e: ValidationError, flags: dict[tuple, str]) -> str:
    parts = []
    for err in e.errors():
        loc = tuple(str(x) for x in err.get("loc", ()))
        flag = flags.get(loc)
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"--{flag}: {msg}" if flag else msg)
    return "; ".join(parts)
