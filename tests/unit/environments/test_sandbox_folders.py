"""A pool killed with SIGKILL leaves its folder; the next pool removes it, and only it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from environments.sandbox_folders import held_pool_folder, sweep_dead_pool_folders

ROOT = Path(__file__).resolve().parents[3]
HOLDER = ("import sys, time\nfrom environments.sandbox_folders import held_pool_folder\n"
          "print(held_pool_folder(sys.argv[1])[0], flush=True)\ntime.sleep(300)")


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
