"""The one place the project takes a file lock: flock, with the filesystems that refuse it handled.

    warning = flock_exclusive(fd, path, wait=False, unprotected="nothing keeps a second run out of this folder")
    ...                          # LockHeld if another process holds it (wait=False); warning is None when locked
    unlock(fd)

Callers: modeling/run_files.py (OUTPUT_DIR/.train.lock, one training run per folder) and data/fast.py (the cache
build, one rank at a time). Why flock: the kernel drops it when the holder dies, however it dies, so there is never a
stale lock. Some filesystems refuse flock altogether (Lustre mounted without `flock`, some NFSv3 mounts without
lockd): the call fails with ENOSYS, EOPNOTSUPP or ENOLCK. That is no reason to stop a run, so the caller gets a
warning line naming the file and what goes unprotected, and goes on. It lives in data/ because modeling/ imports
data/, never the other way round; it needs the standard library only.
"""

import errno
import fcntl

# the filesystem cannot lock at all (as opposed to: someone else holds the lock)
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})
# a non-blocking flock on a held lock (EACCES on some emulations of flock through fcntl locks)
HELD = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


class LockHeld(OSError):
    """Another process holds the lock (only raised with wait=False)."""


def flock_exclusive(fd: int, path, *, wait: bool, unprotected: str) -> str | None:
    """An exclusive flock on `fd` (the open file `path`). None once held; a `warning: ...` line when the filesystem
    does not support locking (`unprotected` says what the caller then goes without). With wait=False a lock held
    elsewhere raises LockHeld; any other OSError propagates."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as err:
        if err.errno in UNSUPPORTED:
            return (f"warning: cannot lock {path} ({err.strerror or err}: the filesystem does not support flock); "
                    f"{unprotected}")
        if not wait and err.errno in HELD:
            raise LockHeld(err.errno, err.strerror, str(path)) from None
        raise
    return None


def unlock(fd: int) -> None:
    """Release the lock explicitly: a child forked while it was held (a Pool worker) shares the open file, so
    closing our descriptor alone would not release it while the child lives."""
    fcntl.flock(fd, fcntl.LOCK_UN)
