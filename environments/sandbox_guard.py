"""An audit hook for sandboxed Python, prepended (as source) to programs that should need nothing
but computation: `sandbox.guarded(code)`.

Inside the hook: file and folder access only under the program's own folder and the standard
library (so no dataset, answer key, repository or `/proc/<parent>` read, whatever the uid
allows), and no new programs, forks, signals or ctypes. A refused operation raises
`PermissionError("... is not allowed in the Estuary sandbox")`, which `sandbox.violation_reason`
reports as a sandbox violation. This is defence in depth: the process sandbox (uid, namespaces,
rlimits) stays the boundary, and an audit hook cannot be removed from Python code.

Stdlib only, no `from __future__`: this text runs first in `main.py`.
"""


def _estuary_guard():
    import os
    import sys

    here = os.path.realpath(os.getcwd())
    roots = tuple(sorted({here} | {os.path.realpath(p) for p in sys.path if p}))
    devices = frozenset(("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"))
    path_events = frozenset((
        "open", "os.listdir", "os.scandir", "glob.glob", "os.chdir", "os.remove", "os.rename",
        "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod", "os.chown",
        "os.utime", "os.listxattr", "os.getxattr", "shutil.copyfile", "shutil.rmtree",
    ))
    denied = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
    ))
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def allowed(path) -> bool:
        if path is None or isinstance(path, int):  # cwd, or an already open descriptor
            return True
        try:
            real = realpath(fsdecode(path))
        except (TypeError, ValueError, OSError):
            return False
        return real in devices or any(real == r or real.startswith(r + sep) for r in roots)

    def hook(event, args):
        if event in path_events:
            if args and not allowed(args[0]):
                raise PermissionError(f"{event} of {args[0]!r} is not allowed in the Estuary sandbox")
        elif event in denied or event.startswith("ctypes."):
            raise PermissionError(f"{event} is not allowed in the Estuary sandbox")

    sys.addaudithook(hook)


_estuary_guard()
del _estuary_guard
