"""The run folder (`--out`) of `dtp-ext train`: checked before any data is read, and locked for
the run's lifetime so that a second run writing the same folder is refused.

The lock is an exclusive `fcntl.flock` on OUT/.lock, held until the run ends. The kernel drops
it when the process dies, so a run killed with SIGKILL leaves no stale lock (at most an
unlocked .lock file, which the next run takes over). A clean exit removes the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # not on POSIX: no locking (documented)
    fcntl = None


def check(out: str, option: str = "--out") -> Path:
    """`out` is, or can become, a writable folder: not a file, not under a file, no name in
    it longer than the file system allows."""
    path = Path(out)
    try:  # before anything touches the path: a name too long makes even exists() raise
        longest = os.pathconf(path.anchor or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    too_long = [p for p in path.parts if len(os.fsencode(p)) > longest]
    if too_long:
        raise ConfigError(
            f"{option}: the folder name {too_long[0][:40]}... is {len(os.fsencode(too_long[0]))} "
            f"bytes long; this file system allows {longest}"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{option} {out}: is a file, expected a folder (or a path where one can be created)"
        )
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{option} {out}: {existing} is a file, so no folder can be created under it"
        )
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == path else f"its parent {existing}"
        raise ConfigError(
            f"{option} {out}: {what} is not writable (permission denied); choose another --out"
        )
    return path


class RunLock:
    """An exclusive lock on OUT/.lock; `acquire` raises ConfigError if another process holds it."""

    def __init__(self, out: str, option: str = "--out"):
        self.out, self.option = Path(out), option
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        check(str(self.out), self.option)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{self.option} {self.out}: cannot create the folder ({exc.strerror})"
            ) from None
        if fcntl is None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(
                    f"{self.option} {self.out}: cannot create {LOCK_NAME} there "
                    f"({exc.strerror}); the folder must be writable"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = f" (pid {holder})" if holder.isdigit() else ""
                    raise ConfigError(
                        f"{self.option} {self.out}: another dtp-ext train process{pid} is writing "
                        f"this folder (it holds {self.path}); wait for it to end or choose "
                        "another --out"
                    ) from None
                raise ConfigError(
                    f"{self.option} {self.out}: cannot lock {self.path} ({exc.strerror})"
                ) from None
            # The holder before us may have removed the file after we opened it: then our lock
            # is on a deleted inode, so start again on the current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return self
            os.close(fd)

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it (see acquire)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
