"""A process killed while building a JIT extension must not block later ones."""

import subprocess
import sys
import time

import pytest

from models.extension_build import exclusive_build


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_a_dead_builders_baton_is_removed(ext_dir):
    baton = ext_dir / "kern_avx2" / "lock"  # what torch's FileBaton leaves after a kill -9
    baton.parent.mkdir()
    baton.touch()
    with exclusive_build("kern_avx2") as folder:
        assert folder == ext_dir / "kern_avx2"
        assert not baton.exists()


def test_the_lock_is_released_when_its_holder_is_killed(ext_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom models.extension_build import exclusive_build\n"
         "with exclusive_build('kern'):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    (ext_dir / "kern").mkdir()
    (ext_dir / "kern" / "lock").touch()  # the holder's baton, as if mid-build
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with exclusive_build("kern"):
        assert not (ext_dir / "kern" / "lock").exists()
    assert time.monotonic() - started < 5
