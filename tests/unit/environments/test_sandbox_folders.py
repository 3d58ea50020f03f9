"""A pool killed with SIGKILL leaves its folder; the next pool removes it, and only it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from environments.sandbox_folders import held_pool_folder, remove_tree, sweep_dead_pool_folders

ROOT = Path(__file__).resolve().parents[3]
HOLDER = ("import sys, time\nfrom environments.sandbox_folders import held_pool_folder\n"
          "print(held_pool_folder(sys.argv[1])[0], flush=True)\ntime.sleep(300)")


def _deep_tree(root: str, depth: int, name: str, link_to: str) -> None:
    """`depth` folders named `name` one in another under `root`, made by descriptor (the path
    outgrows PATH_MAX), with a file and links out at every 100th level."""
    fd = os.open(root, os.O_RDONLY)
    for level in range(depth):
        os.mkdir(name, dir_fd=fd)
        if level % 100 == 0:
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.symlink(link_to, "link", dir_fd=fd)
            os.symlink("..", "up", dir_fd=fd)
        down = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = down
    os.close(fd)


def _aged(path: str) -> str:
    os.utime(path, (1, 1))  # as if made long ago: past the sweep's minimum age
    return path


def test_only_the_folders_of_dead_pools_are_swept(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    dead = killed.stdout.readline().strip()
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    Path(dead, "estuary-sbx-run").mkdir()  # a run was in flight
    _aged(dead)
    alive, lock = held_pool_folder(str(tmp_path))
    _aged(alive)
    older = Path(tmp_path, "estuary-sbx-pool-old")  # an older Estuary's: no lock file
    older.mkdir()
    _aged(str(older))
    young_killed = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True)
    young = young_killed.stdout.readline().strip()
    os.kill(young_killed.pid, signal.SIGKILL)
    young_killed.wait()
    try:
        assert sweep_dead_pool_folders(str(tmp_path)) == [dead]
        assert not os.path.exists(dead)
        assert os.path.isdir(alive) and os.path.isdir(older) and os.path.isdir(young)
        assert sweep_dead_pool_folders(str(tmp_path), min_age_s=0) == [young]  # once old enough
    finally:
        os.close(lock)
    assert sweep_dead_pool_folders(str(tmp_path), min_age_s=0) == [alive]  # its lock let go


def test_a_planted_folder_or_lock_link_is_never_opened_or_removed(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep")
    planted = tmp_path / "estuary-sbx-pool-planted"
    planted.mkdir()
    os.symlink(target, planted / ".owner-lock")  # the lock is a link: not a pool of ours
    linked = tmp_path / "estuary-sbx-pool-linked"
    os.symlink(planted, linked)  # the folder is a link
    fifo = tmp_path / "estuary-sbx-pool-fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".owner-lock")  # opening it for writing would block without O_NONBLOCK
    for path in (planted, fifo):
        _aged(str(path))
    assert sweep_dead_pool_folders(str(tmp_path), min_age_s=0) == []
    assert target.read_text() == "keep" and planted.is_dir() and linked.is_symlink() and fifo.is_dir()


def test_a_folder_that_cannot_be_emptied_keeps_its_lock_for_a_later_sweep(tmp_path):
    if os.geteuid() == 0:
        import pytest

        pytest.skip("root removes files from folders without write permission")
    base, lock = held_pool_folder(str(tmp_path))
    stuck = Path(base, "estuary-sbx-run")
    stuck.mkdir()
    (stuck / "f").write_text("x")
    stuck.chmod(0o500)
    os.close(lock)
    try:
        assert sweep_dead_pool_folders(str(tmp_path), min_age_s=0) == []
        assert Path(base, ".owner-lock").is_file()
    finally:
        stuck.chmod(0o700)
    assert sweep_dead_pool_folders(str(tmp_path), min_age_s=0) == [base]


def test_a_dead_pool_folder_too_deep_to_recurse_is_swept(tmp_path):
    """`shutil.rmtree` recurses once per level: a run's 1200-deep tree, left when its pool was
    killed, raised RecursionError in every new pool's sweep (so `SandboxPool()` itself failed)."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    base, lock = held_pool_folder(str(tmp_path))
    try:
        os.mkdir(os.path.join(base, "estuary-sbx-run"))
        _deep_tree(os.path.join(base, "estuary-sbx-run"), 1200, "d" * 100, str(canary))
        os.close(lock)
        assert sweep_dead_pool_folders(str(tmp_path), min_age_s=0) == [base]
        assert not os.path.exists(base)
        assert (canary / "keep").read_text() == "keep"  # links are removed, never followed
    finally:  # pytest's own clean-up of old temporary folders recurses: a tree left here would
        remove_tree(base)  # crash a later session's end
