"""A training run's own files in OUTPUT_DIR beside the checkpoints: the lock that keeps a second run out, and
train_log.jsonl (one JSON record per line, strict JSON).

    with OutputDirLock(output_dir):     # a second run into the same folder: OutputDirBusy naming the holder
        repair_log(log_file)            # a torn last line (a full disk during an append) is cut off
        append_log(log_file, record); records = read_log(log_file)
    with claimed_output_dir(output_dir):  # scripts/train.py: both on rank 0, a failure as one `error: ...` line

Why flock (through data/locking.py, the project's one lock helper): the kernel drops the lock when the holding
process dies, however it dies (SIGKILL, OOM killer), so a killed run never leaves a stale lock behind and the
relaunch needs no clean-up. On a network filesystem, flock works across machines on NFSv4 (Linux emulates it with
NFS byte-range locks); on filesystems without it (some Lustre and old NFSv3 mounts) locking fails with an error
that is reported as a warning, and the run goes on unprotected.
"""

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from data.locking import LockHeld, flock_exclusive
from modeling import strict_json

LOCK_FILE = ".train.lock"  # in OUTPUT_DIR; it stays there (an unlocked file is no lock)


class OutputDirBusy(RuntimeError):
    """Another live training run holds OUTPUT_DIR."""


class OutputDirLock:
    """An exclusive flock on OUTPUT_DIR/.train.lock for the lifetime of the `with` block (one process per run: the
    main one). The holder's pid, host and start time are written into the file for the next run's message.

    `warning` (None, or a line to print) tells that the filesystem refused locking altogether."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE
        self.warning: str | None = None
        self._fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'ed children (PEP 446)
        try:
            self.warning = flock_exclusive(fd, self.path, wait=False,
                                           unprotected="nothing keeps a second run out of this folder")
        except LockHeld:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise OutputDirBusy(f"{self.path.parent} is in use by another training run ({holder}); wait for it "
                                "to end or choose another --output_dir") from None
        except OSError:
            os.close(fd)
            raise
        if self.warning:  # no lock to hold: the file is left as it is
            os.close(fd)
            return self
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock (the text stays: harmless, rewritten by the next holder)
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def claimed_output_dir(output_dir: Path):
    """OUTPUT_DIR locked for the run by its main process (RANK 0; the lock dies with the process), a torn last line
    of train_log.jsonl cut off; a folder in use or not writable is one line."""
    if int(os.environ.get("RANK", "0")):  # rank 0 holds the lock for every process of the run
        yield
        return
    lock = OutputDirLock(output_dir)
    try:
        lock.acquire()
    except OutputDirBusy as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:  # read-only filesystem, permissions
        raise SystemExit(f"error: --output_dir {output_dir}: cannot write there ({err}); expected a writable "
                         "folder") from None
    try:
        for line in (lock.warning, repair_log(output_dir / "train_log.jsonl")):
            if line:
                print(line if line.startswith("warning: ") else f"warning: {line}", flush=True)
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------- the log
def repair_log(log_file) -> str | None:
    """Cut off a torn last line (no newline, or not JSON: what a full disk during an append leaves). Returns a line
    saying what was cut, or None when the log is intact or absent."""
    log_file = Path(log_file)
    if not log_file.is_file():
        return None
    data = log_file.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, max(len(data) - 1, 0)) + 1
        try:
            json.loads(data[last_start:])
        except ValueError:
            keep = last_start if data else 0
    if keep == len(data):
        return None
    with open(log_file, "r+b") as f:
        f.truncate(keep)
    return f"{log_file}: cut off a torn last line ({len(data) - keep} bytes, e.g. from a full disk)"


def append_log(log_file, record: dict) -> None:
    with open(log_file, "a") as f:
        f.write(strict_json.dumps(record) + "\n")  # null, never NaN: strict parsers read it


def read_log(log_file) -> list[dict]:
    """The records of train_log.jsonl; a line that is not JSON (torn by a full disk) is skipped."""
    records = []
    for line in Path(log_file).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
