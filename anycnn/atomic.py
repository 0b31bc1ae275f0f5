"""Atomic file writes, shared by checkpoints, ONNX export, the image cache and the CLI.

:func:`atomic_write_bytes` writes the bytes to a temporary file in the target's folder,
flushes and fsyncs it, then ``os.replace`` puts it in place and the folder is fsynced: a failed
or interrupted write leaves the previous file intact and no temporary file behind.

Test hook: ``ANYCNN_TEST_SLOW_WRITE=<seconds>`` makes :func:`atomic_write_bytes` sleep after
writing the temporary file and before fsync/rename, so tests can kill a process mid-save.

This module sits at the bottom of the package with :mod:`anycnn.errors`: it imports nothing
else from anycnn.
"""

from __future__ import annotations

import os
import pathlib
import secrets

from .errors import CheckpointError

#: Test hook (not for users): seconds to sleep between writing the temporary file and fsyncing /
#: renaming it, so a test can kill a process in the middle of a save. Unset or empty: no delay.
SLOW_WRITE_ENV = "ANYCNN_TEST_SLOW_WRITE"


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it is there; ignore every OS error."""
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_directory(directory: pathlib.Path) -> None:
    """Make a rename durable (best effort: some platforms cannot open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_reason(exc: OSError) -> str:
    """The OS's short reason for ``exc`` (``No space left on device``, ...)."""
    return exc.strerror or str(exc) or type(exc).__name__


def _test_slow_write() -> None:
    try:
        delay = float(os.environ.get(SLOW_WRITE_ENV) or 0)
    except ValueError:
        return
    if delay > 0:
        import time

        time.sleep(delay)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *,
                       what: str = "file") -> pathlib.Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    ``what`` names the content in error messages (``"checkpoint"``, ``"history"``, ...).

    Raises:
        CheckpointError: the file cannot be written (the path and the OS reason are named);
            the previous content of ``path``, if any, is left untouched.
    """
    target = pathlib.Path(path)
    directory = target.parent
    tmp = str(directory / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except OSError as exc:
        missing = (f" (the folder {directory} does not exist: create it first)"
                   if not directory.exists() else "")
        raise CheckpointError(f"cannot write {what} {target}: {os_reason(exc)}{missing}"
                              ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            _test_slow_write()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        remove_quietly(tmp)
        raise CheckpointError(f"cannot write {what} {target}: {os_reason(exc)}") from exc
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_directory(directory)
    return target
