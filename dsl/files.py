"""Reading user-named files without hanging: only regular files, and never past a size limit.

Opening a FIFO for reading blocks until a writer comes, and a device such as /dev/zero never
ends; both look like files to `open`. Every file qspec reads because a user named it (specs,
includes, data) goes through here or through `regular_file_problem` first.
"""

from __future__ import annotations

import errno
import os
import stat

KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """The path names something other than a regular file, or one too large to read."""

    def __init__(self, path: str | os.PathLike[str], why: str):
        super().__init__(errno.EINVAL, why, os.fspath(path))


def _kind(mode: int) -> str:
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def regular_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as a file ('not a regular file (a FIFO)', 'No such file or
    directory'), or None: for callers that hand the path to a library that opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return error.strerror or str(error)
    if not stat.S_ISREG(mode):
        return f"not a regular file ({_kind(mode)})"
    return None


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file at `path`. Raises OSError for anything else and for a file
    over `limit` bytes; opening is non-blocking, so a FIFO swapped in after a check cannot hang."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(path, f"not a regular file ({_kind(mode)})")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise NotRegularFile(path, f"larger than {limit // 2**20} MiB")
    return data


def numpy_load_error(error: Exception) -> str:
    """numpy's message for a file it cannot load, without its advice to load pickles
    ("If you trust the file ... allow_pickle"): qspec never unpickles a data file."""
    text = str(error)
    if "allow_pickle" in text or "pickled" in text:
        return "not arrays numpy can read without unpickling (qspec never unpickles data files)"
    return text
