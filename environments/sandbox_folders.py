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
import stat
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
        fd = _dead_pool_lock(base, min_age_s)
        if fd is None:
            continue
        try:
            if _remove(base):
                removed.append(base)
        finally:
            os.close(fd)
    return removed


def _dead_pool_lock(base: str, min_age_s: float) -> int | None:
    """A descriptor holding `base`'s lock when its pool is dead; None when it is alive, too young
    or not ours. Only a real folder of our uid counts, and only a lock that is a regular file of
    ours: the temp dir is shared, and a planted `.owner-lock` symlink must not make us open (and
    hold, or block on) whatever it points at."""
    try:
        info = os.lstat(base)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or time.time() - info.st_mtime < min_age_s:
            return None
        fd = os.open(os.path.join(base, LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:  # gone meanwhile, a link, or an older Estuary's (no lock file)
        return None
    try:
        lock = os.fstat(fd)
        if stat.S_ISREG(lock.st_mode) and lock.st_uid == os.geteuid():
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its pool holds it
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _remove(base: str) -> bool:
    """Everything in `base` but the lock file, then the lock file and `base` itself. A folder that
    cannot be emptied (a run left a subfolder without write permission) keeps its lock file, so a
    later sweep tries again rather than taking it for an older Estuary's."""
    for entry in os.scandir(base):
        if entry.name == LOCK:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # never follows links (fd-based walk)
            else:
                os.unlink(entry.path)
        except OSError:
            return False
    try:
        os.unlink(os.path.join(base, LOCK))
        os.rmdir(base)
    except OSError:
        return False
    return True
