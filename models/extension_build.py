"""One process at a time builds or loads a JIT C++ extension, and a killed one blocks nobody.

`torch.utils.cpp_extension.load` guards each build folder with a `FileBaton`: a plain `lock` file
that the holder deletes when it is done. A process killed inside that window (a `kill -9` of a
rollout worker or learner, as the chaos run does, or a test run stopped by hand) leaves the file
behind, and every later process that loads the same extension waits on it forever. Here every
Estuary build or load holds an `flock` on a file next to the build folder; the kernel drops an
flock when its holder dies, so while we hold it any baton in the folder is a leftover of a dead
process and is removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def extensions_dir() -> Path:
    """Where torch builds JIT extensions (`TORCH_EXTENSIONS_DIR`, default under ~/.cache/estuary),
    set in the environment so torch and DeepSpeed use the same folder."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/estuary/torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


@contextmanager
def exclusive_build(name: str) -> Iterator[Path]:
    """Hold the build lock of extension `name` (yields its build folder), clearing a dead
    process's baton first."""
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.estuary-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for baton in root.glob(f"{name}*/lock"):
                log.warning("removing %s, left by a process killed while building %s", baton, name)
                baton.unlink(missing_ok=True)
            yield root / name
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_deepspeed_shm_comm() -> None:
    """Build or load DeepSpeed's CPU shared-memory collective under the build lock before
    `deepspeed.init_distributed` asks for it (DeepSpeed keeps the loaded op, so its own call then
    does not touch the baton). The lock must not be held across `init_distributed` itself: that
    waits for the other ranks, which would be waiting for the lock."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    with exclusive_build(builder.NAME):
        builder.load()
