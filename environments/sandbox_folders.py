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

    remove_tree(path)                   # any folder a run filled, however deep; never raises

A run's folder holds whatever hostile code made there: a tree 1200 folders deep made
`shutil.rmtree`, which recurses once per level, raise RecursionError in the trusted process (past
`ignore_errors`, which covers OSError only). `remove_tree` walks without recursion, holds two
descriptors at most and never forms a path below the folder it was given, so neither depth nor
the length of names stops it; what it cannot remove stays, and is logged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import stat
import tempfile
import time

PREFIX = "estuary-sbx-pool-"
LOCK = ".owner-lock"
MIN_AGE_S = 60.0
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW  # os.open adds O_CLOEXEC

log = logging.getLogger(__name__)


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
    return remove_tree(base, last=LOCK)


def remove_tree(path: str, last: str | None = None) -> bool:
    """Remove the folder `path` and everything in it, at any depth, never following a link; True
    when it is gone (or was). Never raises. With `last`, that entry of `path` is removed only once
    everything else was, so a folder that could not be emptied keeps it (a pool's lock file)."""
    try:
        try:
            fd = os.open(path, _DIR)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            os.unlink(path)  # a link or a file in its place: the entry goes, never its target
            return True
        try:
            if not _empty(fd, last):
                log.warning("sandbox: could not remove all of %s; the rest stays", path)
                return False
            if last is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(last, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(path)
        return True
    except Exception as e:  # noqa: BLE001 - whatever a run left must not break the trusted side
        log.warning("sandbox: could not remove %s: %r", path, e)
        return False


def _empty(top: int, keep: str | None) -> bool:
    """Remove everything in the folder open as `top` but its entry `keep`; True if all of it went.

    Depth first without recursion: down into a folder by name, holding only the names still to
    remove at each level above (no descriptor), and back up by `..`, which must be the folder it
    came from (device and inode), else a folder moved meanwhile and the walk stops.
    """
    ok = True
    # One item a level below `top`: (its name, its parent's device and inode, the parent's names left)
    stack: list[tuple[str, tuple[int, int], list[tuple[str, bool]]]] = []
    fd = os.open(".", _DIR, dir_fd=top)  # a description of our own: `top`'s offset stays the caller's
    try:
        pending = _listing(fd, keep)
        while True:
            if pending:
                name, is_dir = pending.pop()
                if not is_dir:
                    try:
                        os.unlink(name, dir_fd=fd)
                        continue
                    except FileNotFoundError:
                        continue
                    except IsADirectoryError:
                        pass  # a folder now: go down into it
                    except OSError:
                        ok = False
                        continue
                try:
                    child = os.open(name, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):  # cannot be opened: stays
                        ok = False
                        continue
                    try:  # a link or a file now; once, so that no swapping keeps the walk here
                        os.unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        ok = False
                    continue
                try:
                    listing = _listing(child, None)
                except OSError:
                    os.close(child)
                    ok = False
                    continue
                here = os.fstat(fd)
                stack.append((name, (here.st_dev, here.st_ino), pending))
                os.close(fd)
                fd, pending = child, listing
                continue
            if not stack:
                return ok
            name, parent_id, pending = stack.pop()  # this folder is done: up, and remove it there
            parent = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd = parent
            up = os.fstat(fd)
            if (up.st_dev, up.st_ino) != parent_id:
                log.warning("sandbox: a folder moved while it was being removed; the rest stays")
                return False
            try:
                os.rmdir(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
    finally:
        os.close(fd)


def _listing(fd: int, skip: str | None) -> list[tuple[str, bool]]:
    """The entries of the folder open as `fd` (but `skip`), each with whether it is a folder."""
    with os.scandir(fd) as entries:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries if e.name != skip]

