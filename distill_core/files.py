"""Files written for the user (checkpoints, exported weights, label files): through a temporary
file beside the target, renamed into place, so a crash or a full disk leaves the previous file and
no temporary; and only to a new path or over a regular file. A symbolic link, a device node, a
FIFO or a directory at the target is refused: renaming over `/dev/null` would replace the device
with a file, and over a link would replace the link, not what it points to.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def check_target(path: str | Path) -> Path:
    """`path`, if a file may be written there: nothing is there, or a regular file (not a link)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if stat.S_ISREG(mode):
        return path
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise ValueError(f"{path} is {kind}: files are written to a new path or over a regular file only")


def write_error(path: Path, e: BaseException) -> ValueError | None:
    """The one-line error of a failed write (a full disk, a size limit, a read-only folder), or None
    when `e` is not one. torch.save reports its file's OSError as a RuntimeError."""
    cause = e if isinstance(e, OSError) else e.__context__
    if not isinstance(cause, OSError):
        return None
    return ValueError(f"cannot write {path}: {cause.strerror or cause}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, synced and renamed to `path`; on any failure
    the temporary is removed and `path` is as it was. ValueError names a refused target or a failed
    write in one line."""
    path = check_target(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_target(path)  # what was there may have changed while we wrote
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        error = write_error(path, e)
        if error is None:
            raise
        raise error from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path
