"""A sandbox slot's fork server: one interpreter that starts once and forks each execution.

    python -I -S -B sandbox_forkserver.py SOCKET_FD BASE_DIR slot-uids|no-uids   # by `sandbox_spawn.ForkServer`

Starting `python -I -S` for every execution, from a parent that has torch loaded, cost a code
verdict about 30 ms of CPU: the fork of the big parent (~10 ms), the interpreter's start (~9 ms)
and the worker's imports (~9 ms). This program pays those once per slot. It sets up its
namespaces once: for runs under slot uids (as root), an empty network namespace and a mount
namespace whose /tmp, /var/tmp and /dev/shm are private tmpfs, emptied after every run, with the
pool's work folders (BASE_DIR) bound back in place; otherwise a user and network namespace if the
kernel allows (the exec after it drops every capability, root's included). For each
request it forks a child that sets itself up as a fresh sandboxed process was (its own session,
the slot uid, resource limits, its folder as cwd, a scrubbed environment, closed stdin) and runs
`main.py` as `__main__`, as `python -I -S -B main.py ARGS` would, in that same interpreter.

The child inherits this interpreter's stdlib state and nothing else. ctypes, needed once for
unshare and mount, never reaches it: the server sets up its namespaces, then execs a fresh
interpreter inside them, so the audit hook of `sandbox_guard` refuses ctypes as in a fresh
interpreter (an import asks for `ctypes.dlopen`).

Protocol, one request at a time over a SOCK_SEQPACKET socket (messages are JSON):
    parent -> server  {"workdir", "uid", "limits", "nfds"} + SCM_RIGHTS [stdout, stderr, *fds]
    server -> parent  {"pid": p} | {"error": why the child could not be set up}
    server -> parent  {"exit": returncode}        (when it ends; not reaped yet)
    parent -> server  {"reap": true}              (after the parent killed what the run left)
The child is reaped only when the parent says so: until then its pid, which is also its process
group, cannot be reused, so the parent's `killpg` can never hit another process. EOF from the
parent (its process ended) kills the running child and ends the server.

Stdlib only, no `from __future__`: it runs under the sandbox's interpreter, outside the venv.
"""

import array
import json
import os
import resource
import select
import shutil
import signal
import socket
import sys

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET, _CLONE_NEWIPC = 0x00020000, 0x10000000, 0x40000000, 0x08000000
# System V IPC objects outlive their creator: in the slot's own IPC namespace these limits are 0, so a
# run can make no shared memory, message queue or semaphore set for a later run to find. (POSIX shm
# and semaphores go through /dev/shm: private and emptied after each run on the root path only.)
_NO_SYSV_IPC = (("/proc/sys/kernel/shmmni", "0"), ("/proc/sys/kernel/msgmni", "0"),
                ("/proc/sys/kernel/sem", "0 0 0 0"), ("/proc/sys/fs/mqueue/queues_max", "0"))
_MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV, _MS_BIND = 0x4000, 0x40000, 0x2, 0x4, 0x1000
_PR_SET_NO_NEW_PRIVS = 38
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# A run fills at most 16 MB and 4096 files per folder: emptying it costs the next run little.
TMPFS_OPTIONS = b"size=16m,nr_inodes=4096,mode=1777"
CHANNEL_FD = 3  # a channel's descriptors become 3, 4, ... in the child (named in its argv)


def _isolate(base, slot_uids):
    """Once, in the server: the namespaces every child shares. Returns the private tmpfs folders
    with their device numbers (only those are emptied after each run: a failed mount leaves the
    host's). The root path is for runs that get a slot uid; otherwise, root or not, a user and
    network namespace (the exec that follows drops every capability, as it did per run). Both
    get an IPC namespace without System V IPC (`_private_ipc`). Each
    step is optional, as before: a container without CAP_SYS_ADMIN cannot make namespaces."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    private = []
    if os.geteuid() == 0 and slot_uids:
        if libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET) == 0:
            keep = os.open(base, os.O_PATH | os.O_DIRECTORY)
            if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0:
                for path in PRIVATE_DIRS:
                    if os.path.isdir(path) and libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                                                          TMPFS_OPTIONS) == 0:
                        private.append(f"{path}:{os.stat(path).st_dev}")
                os.makedirs(base, exist_ok=True)
                if libc.mount(f"/proc/self/fd/{keep}".encode(), base.encode(), None, _MS_BIND, None) != 0:
                    sys.exit("sandbox fork server: could not bind the work folders into its namespace")
            os.close(keep)
            _private_ipc(libc)
    else:
        uid, gid = os.geteuid(), os.getegid()
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0 and _map_root(uid, gid):
            # Root of this user namespace for a moment: only its owner may set the IPC limits.
            _private_ipc(libc)
            libc.unshare(_CLONE_NEWUSER)  # nested and unmapped: the exec that follows drops every capability
    # No run gains privileges through exec (setuid-root programs such as mount or passwd run
    # with the run's own uid), however it got to exec one; the server's setuid() is unaffected.
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return private


def _map_root(uid, gid):
    """In a new user namespace: map its root to our own ids (as `unshare -r` does)."""
    try:
        for path, line in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            with open(path, "w") as f:
                f.write(line)
        return True
    except OSError:
        return False


def _private_ipc(libc):
    """A new IPC namespace with System V limits of 0; the writes only ever reach the new one."""
    if libc.unshare(_CLONE_NEWIPC) != 0:
        return
    for path, value in _NO_SYSV_IPC:
        try:
            with open(path, "w") as limit:
                limit.write(value)
        except OSError:
            pass  # a kernel that refuses: the namespace alone still hides the host's objects


def _empty_private_dirs(private, base):
    """What a run left in the private tmpfs folders goes (its processes are dead by now). A folder
    that is no longer the tmpfs mounted at start (its device changed) is never touched, and
    anything that goes wrong ends the server: its successor mounts fresh ones."""
    try:
        for item in private:
            root, dev = item.rsplit(":", 1)
            if os.stat(root).st_dev != int(dev):
                sys.exit(f"sandbox fork server: {root} is no longer its private tmpfs")
            for entry in list(os.scandir(root)):
                if entry.path == base or base.startswith(entry.path + "/"):
                    continue  # the pool's work folders, bound in from the host
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
    except Exception:  # noqa: BLE001 - a tree too deep or too odd to remove: start afresh
        sys.exit(0)


def _descriptors(received, status_w):
    """stdin from /dev/null, stdout and stderr to the parent's files, a channel's ends at 3, 4, ...;
    every other descriptor (this server's socket included) closed but `status_w`, which is
    moved above them all and returned."""
    import fcntl

    status_w = fcntl.fcntl(status_w, fcntl.F_DUPFD, 64)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, status_w + 1) for fd in received]  # none in 0..n
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for target, fd in enumerate(high, start=1):
        os.dup2(fd, target)  # 1: stdout, 2: stderr, 3..: the channel
    os.closerange(len(high) + 1, status_w)
    os.closerange(status_w + 1, 1 << 20)
    return status_w


def _setup(request):
    """In the child: what a fresh sandboxed process had before its first line ran."""
    os.setsid()
    limits, uid = request["limits"], request["uid"]
    mem = limits["memory_mb"] << 20
    # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    for res, value in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_DATA, mem),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] << 20),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, limits["max_processes"]),
    ):
        resource.setrlimit(res, (value, value))
    os.chdir(request["workdir"])
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _child(request, received, status_w):
    """The forked child: set up, then return the program's argv (or exit on a setup failure)."""
    try:
        status_w = _descriptors(received, status_w)
        _setup(request)
    except BaseException:  # a setup that failed must say why, loudly, in the parent
        import traceback

        os.write(status_w, traceback.format_exc().encode()[-4000:])
        os._exit(126)
    os.close(status_w)
    return ["main.py"] + [str(CHANNEL_FD + i) for i in range(request["nfds"])]


def _run_main(argv):
    """Run ./main.py as `__main__`, as `python -I -S -B main.py ARGS` would, and exit."""
    import types

    sys.argv = argv
    path = os.path.abspath(argv[0])
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    with open(path, "rb") as f:
        source = f.read()
    interrupted = False
    try:
        exec(compile(source, path, "exec"), main.__dict__)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException as e:  # printed as `python main.py` prints it: without this file's frames
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        code, interrupted = 1, isinstance(e, KeyboardInterrupt)
    _exit(code, main, interrupted)


def _exit_code(code):
    """SystemExit's argument as the interpreter turns it into a status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if -(1 << 63) <= code < 1 << 63 else 255  # beyond a C long: -1
    print(code, file=sys.stderr)
    return 1


def _exit(code, main, interrupted):
    """What an exiting interpreter does that a program can see: wait for its non-daemon threads,
    run its atexit functions, let its objects go (their `__del__`), flush its output (a failed
    flush is reported, status 120), die by SIGINT after a KeyboardInterrupt. Tearing down the
    server's modules is skipped: in a fork it would write to, and so copy, every page it shares
    with the server (4 of 8.5 ms); its objects are frozen, so the collection walks the run's."""
    import gc

    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    main.__dict__.clear()
    gc.collect()
    for stream in (sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception as e:  # noqa: BLE001 - reported as the interpreter reports it
            _report_flush(stream, e)
            code = code or 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _report_flush(stream, error):
    try:
        os.write(2, f"Exception ignored in: {stream!r}\n{type(error).__name__}: {error}\n".encode())
    except OSError:
        pass


def _exit_status(pid):
    """The child's returncode if it has ended (left unreaped), else None."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _watch(sock, pid):
    """Report the child's end; reap it when the parent says so. False: the parent is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # an older kernel: look every 10 ms
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    reported = False
    try:
        while True:
            events = poller.poll(None if pidfd is not None or reported else 10)
            if not reported:
                code = _exit_status(pid)
                if code is not None:
                    if not _send(sock, {"exit": code}):
                        _kill(pid)
                        return False
                    reported = True
                    if pidfd is not None:
                        poller.unregister(pidfd)
            if any(fd == sock.fileno() for fd, _ in events):
                try:
                    message = sock.recv(4096)  # {"reap": true}, or EOF: the parent is gone
                except OSError:  # ECONNRESET: it died with our last message unread
                    message = b""
                _kill(pid)
                return bool(message)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill(pid):
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _spawn(sock, request, received):
    """Fork one execution. Returns its argv in the child; in the server, None once it is reaped."""
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        return _child(request, received, status_w)
    os.close(status_w)
    for fd in received:
        os.close(fd)
    failure = b""
    while True:
        chunk = os.read(status_r, 4096)  # EOF: the child closed it after a good setup, or exited
        if not chunk:
            break
        failure += chunk
    os.close(status_r)
    if failure:
        _kill(pid)
        if not _send(sock, {"error": failure.decode(errors="replace")}):
            sys.exit(0)
        return None
    if not _send(sock, {"pid": pid}) or not _watch(sock, pid):
        _kill(pid)
        sys.exit(0)  # the parent is gone: so is the run
    return None


def _send(sock, message):
    try:
        sock.send(json.dumps(message).encode())
        return True
    except OSError:
        return False


def serve(sock, base, private):
    """Answer requests until the parent goes; returns only in a forked child (its argv).
    `private`: the tmpfs folders to empty after each run."""
    while True:
        fds = array.array("i")
        try:
            message, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * fds.itemsize))
        except OSError:  # the parent died with a reply of ours unread
            message = b""
        if not message:
            sys.exit(0)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        argv = _spawn(sock, json.loads(message), list(fds))
        if argv is not None:
            sock.detach()  # its descriptor is closed already (`_descriptors`)
            return argv
        _empty_private_dirs(private, base)


def _guard_blocked() -> frozenset[str]:
    """The modules `sandbox_guard` refuses (its `_ESTUARY_BLOCKED`), read from its source: the
    guard is program text, not a module this process may import (importing it installs it)."""
    import ast

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_ESTUARY_BLOCKED":
                return frozenset(ast.literal_eval(node.value))
    raise RuntimeError("sandbox_guard.py has no _ESTUARY_BLOCKED")


def _preload_builtins():
    """Load the built-in modules a run may import, once: a run cannot make one itself (the audit
    hook of `sandbox_guard` replaces `_imp.create_builtin`, which makes one without an audit
    event) and the guard would otherwise load them in every run (about 1 ms). Never one that the
    guard refuses: it would not run a program at all."""
    refused = _guard_blocked() | {"spwd"}  # spwd: deprecated, warns
    for name in sys.builtin_module_names:
        if name not in sys.modules and name not in refused and not name.startswith("_test"):
            __import__(name)


def _freeze():
    """Everything the server holds goes to the collector's permanent generation: a child's
    collections then skip it, and so do not touch (and copy) the pages it shares with the server."""
    import gc

    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    _fd, _base, _mode = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3]
    if len(sys.argv) == 4:  # first start: the namespaces, then a fresh interpreter inside them
        _private = _isolate(_base, _mode == "slot-uids")  # (ctypes loaded: it must not reach a child)
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", __file__, _fd, _base, _mode, ",".join(_private)])
    _preload_builtins()
    _freeze()
    _run_main(serve(socket.socket(fileno=int(_fd)), _base, [d for d in sys.argv[4].split(",") if d]))
