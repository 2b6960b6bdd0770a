"""One writer per output, and outputs checked writable before any work.

Every stage claims its output before it reads a model or computes anything (`claim_output`):

* the folder is created and must be writable, and an existing output file must be writable: an unwritable
  location fails at once, naming it, instead of after the first batch or training step;
* an exclusive advisory lock (`fcntl.flock`) is taken on a lock file beside the output (`<file>.lock`, or
  `<folder>/.lock` for a folder output such as training's `output_dir`) and held for the run. The lock file
  holds the holder's pid; a second run into the same output is refused with that pid. The kernel drops a
  flock when its process dies (even by SIGKILL), so the lock of a dead run is simply taken over.

Locks are advisory: they keep sealong runs apart, not other programs, and need a file system with working
flock (local disks do; some network file systems do not).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputError(ValueError):
    """An output that cannot be written: in use by another run, not writable, or out of space. The message
    names the output (and, for a full disk, what was kept)."""


def lock_path(path: str, directory: bool = False) -> str:
    return os.path.join(path, ".lock") if directory else path + ".lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return text or "unknown"


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The exclusive lock on one output; `acquire()` checks the location and takes it, `release()` frees it."""

    def __init__(self, path: str, directory: bool = False, what: str = "output"):
        self.path, self.directory, self.what = str(path), directory, what
        self.file = lock_path(self.path, directory)
        self.fd = None
        self.took_over = None  # pid of a dead run whose lock file was found

    def _unwritable(self, detail: str) -> OutputError:
        return OutputError(f"{self.what} {self.path} is not writable: {detail}")

    def acquire(self) -> "OutputLock":
        folder = self.path if self.directory else os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise self._unwritable(f"cannot create the folder {folder} ({err.strerror})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise self._unwritable(f"no write permission in {folder}")
        if not self.directory and os.path.exists(self.path) and (os.path.isdir(self.path) or not os.access(self.path, os.W_OK)):
            raise self._unwritable("it is a folder" if os.path.isdir(self.path) else "no write permission")
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise self._unwritable(f"cannot create {self.file} ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                raise OutputError(f"{self.what} {self.path} is in use by another run (pid {pid}, lock file "
                                  f"{self.file}): wait for it to finish or stop it, or choose another output") from None
            # the file may have been unlinked by its previous holder between our open and our flock: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _holder(fd)
        if previous not in ("unknown", str(os.getpid())) and not _alive(previous):
            self.took_over = previous
            print(f"{self.what} {self.path}: taking over the lock of pid {previous} (no longer running)",
                  file=sys.stderr)
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:
            os.close(fd)
            raise self._unwritable(f"cannot write {self.file} ({err.strerror})") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file)  # before unlocking: a waiting opener then sees a new inode and retries
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def claim_output(path: str, directory: bool = False, what: str = "output") -> OutputLock:
    """`with claim_output(path): ...` -- check that `path` can be written and hold its lock for the block."""
    return OutputLock(path, directory, what)


@contextlib.contextmanager
def claim_outputs(*claims):
    """Hold several claims (path, directory, what) together; None entries are skipped."""
    with contextlib.ExitStack() as stack:
        for claim in claims:
            if claim is not None and claim[0] is not None:
                stack.enter_context(claim_output(*claim))
        yield


def disk_full(err: OSError, where: str, kept: str) -> OutputError | None:
    """An OutputError saying what was kept when `err` is a full disk or quota, else None (re-raise `err`)."""
    if isinstance(err, OSError) and err.errno in DISK_FULL:
        return OutputError(f"{where}: {os.strerror(err.errno)}; {kept}")
    return None
