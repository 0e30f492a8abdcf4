"""Secrets in URLs: never on a command line (`ps` shows every process's arguments to every user),
never in a log line or an answer.

A store URL that needs a password is given as `env:NAME` (the URL is the environment variable
NAME's value, e.g. `--store env:DISTILL_STORE`) or `@FILE` (the first line of FILE), anywhere a
store URL is taken; configurations keep that form (so a command line built from one never holds the
password) and the store resolves it when it connects. A URL written out with a password or a secret
query parameter on any command line is refused before anything runs. `redact` masks the same parts
wherever a URL is shown.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from pydantic import AfterValidator

# query parameters that carry a secret (redis-py reads `?password=`), as redis-py decodes their names
SECRET_PARAMS = ("password", "passwd", "pass", "pwd", "secret", "token", "auth", "key")
URL_SCHEMES = ("redis", "rediss", "unix", "http", "https")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter's name (percent-encoded or not: `%70assword`) names a secret."""
    return any(word in unquote_plus(name).lower() for word in SECRET_PARAMS)


def redact(url: str) -> str:
    """The URL with its secrets replaced: a user name and password in front of the host, and the
    value of any query parameter whose name says secret (`?password=`, which redis-py accepts
    too, also percent-encoded). What logs, errors and summaries show; every one of them goes
    through here."""
    try:
        parts = urlsplit(str(url))
    except ValueError:  # not even a URL: nothing of it is shown
        return "***"
    netloc = parts.netloc
    if parts.password is not None or parts.username is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        netloc = "***@" + host + (f":{parts.port}" if parts.port else "")
    query = parts.query
    if query:
        masked = []
        for item in query.split("&"):
            name, sep, value = item.partition("=")
            masked.append(f"{name}=***" if sep and is_secret_param(name) else item)
        query = "&".join(masked)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_has_secret(text: str) -> bool:
    """Whether `text` is a URL with a password (or a user name) in front of its host or a secret
    query parameter."""
    try:
        parts = urlsplit(text)
        if parts.scheme.lower() not in URL_SCHEMES:
            return False
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:
        return False
    query = [item.partition("=") for item in parts.query.split("&") if item]
    return userinfo or any(sep and is_secret_param(name) for name, sep, _ in query)


def refuse_secrets_in(argv: Sequence[str]) -> None:
    """ValueError when a command line holds a URL with a secret (also as `--flag=URL`)."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if url_has_secret(value):
            raise ValueError(
                f"a URL with a password on the command line ({redact(value)}) is shown to every user by `ps`: give "
                "it as env:NAME (an environment variable holding the URL, e.g. env:DISTILL_STORE) or "
                "@FILE (a file holding it)"
            )


def resolve_url(value: str, what: str = "a URL") -> str:
    """The URL `value` names: an `env:NAME` variable's value, an `@FILE`'s first line, or itself."""
    if value.startswith("env:"):
        name = value[4:]
        url = os.environ.get(name, "").strip()
        if not url:
            raise ValueError(f"{what} {value}: the environment variable {name} is not set")
        return url
    if value.startswith("@") and len(value) > 1:
        path = Path(value[1:])
        if not path.is_file():
            raise ValueError(f"{what} {value}: no such file")
        lines = path.read_text().strip().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"{what} {value}: the file is empty")
        return lines[0].strip()
    return value


def _resolvable(value: str) -> str:
    resolve_url(value)  # refused now, by the flag's name, when env:NAME or @FILE names nothing
    return value  # kept as given: the store resolves it when it connects, so it is never written out


# a configuration field holding a store URL, given as itself, env:NAME or @FILE
SecretURL = Annotated[str, AfterValidator(_resolvable)]
