"""The sandbox pools' folders under the temp dir: each held by its pool's lock, and swept once dead.

    base, lock = held_pool_folder()     # the pool's folder, locked for as long as `lock` is open
    sweep_dead_pool_folders()           # folders whose pool died without closing (kill -9)

A pool removes its folder when it closes or its process exits, but a process killed with
SIGKILL leaves it behind (empty, unless a run was in flight). Whether its owner is gone cannot
be told by pid: the owner may live in another pid namespace that shares this `/tmp`. A `flock`
on a file in the folder can: the kernel drops it when the last descriptor of the owner's open
file closes, however the owner ended, in any namespace. So each pool holds one, and a new pool
removes the folders whose lock it can take. Folders without a lock file (an older Estuary) are
never touched, nor are folders younger than a minute (their pool may be between making the
folder and locking it).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
import time

PREFIX = "estuary-sbx-pool-"
LOCK = ".owner-lock"
MIN_AGE_S = 60.0


def held_pool_folder(root: str | None = None) -> tuple[str, int]:
    """A new pool folder and the descriptor whose lock marks it as live (close it to let it go)."""
    base = tempfile.mkdtemp(prefix=PREFIX, dir=root)
    fd = os.open(os.path.join(base, LOCK), os.O_CREAT | os.O_RDWR, 0o600)  # not inherited by exec
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return base, fd


def sweep_dead_pool_folders(root: str | None = None, min_age_s: float = MIN_AGE_S) -> list[str]:
    """Remove the pool folders under `root` whose owner is gone; returns them."""
    removed = []
    for base in glob.glob(os.path.join(root or tempfile.gettempdir(), PREFIX + "*")):
        try:
            if time.time() - os.stat(base).st_mtime < min_age_s:
                continue
            fd = os.open(os.path.join(base, LOCK), os.O_RDWR)
        except OSError:  # not ours to read, gone meanwhile, or an older Estuary's (no lock file)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its pool is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(base, ignore_errors=True)
            removed.append(base)
        finally:
            os.close(fd)
    return removed
