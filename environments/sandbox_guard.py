"""An audit hook for sandboxed Python, prepended (as source) to programs that should need nothing
but computation: `sandbox.guarded(code)`.

Inside the hook, files are read only under the program's own folder and the standard library (so
no dataset, answer key, repository or `/proc/<parent>` read, whatever the uid allows), and written,
removed, linked to, renamed or made the current folder only under its own folder. No path may have
a `..` component: the `open` event does not show a `dir_fd`, so a path relative to one is checked
against the current folder; without `..` it stays under the descriptor's folder, and no descriptor
on a folder outside the program's own is ever opened. Extension modules load only from the
standard library (a `.so` the program wrote would run native code). No new programs, forks,
signals, ctypes, subinterpreters, network connections or `gc` walks (which would find this hook).

Modules that reach those, or files, without an audit event cannot be imported (`_ctypes`,
`_xxsubinterpreters`, `_testcapi`, `_tkinter`, `readline`, `_curses`, `_dbm`, `syslog`: a
`ModuleNotFoundError`, so a module with a fallback still imports). `_posixsubprocess`, whose
`fork_exec` starts a program without `subprocess.Popen`'s event, is loaded here with a `fork_exec`
that refuses, so `subprocess` and `asyncio` still import. One imported before the guard cannot be
taken back (an extension module with single-phase init is re-created from a cache without an audit
event, and other modules may hold its functions), so the guard then refuses to run the program. A
built-in module is made by `_imp.create_builtin` without any audit event (Debian's python3.11
builds `_posixsubprocess` in): the guard loads the built-in modules a program may use, then
replaces it with a function that refuses (a wrapper holding the real one would hand it to a signal
handler that reads the wrapper's frame).

A refused operation raises `PermissionError("... is not allowed in the Estuary sandbox")` (an
import, `ModuleNotFoundError`), which `sandbox.violation_reason` reports as a sandbox violation.
This is defence in depth: the process sandbox (uid, namespaces, rlimits) stays the boundary, and an
audit hook cannot be removed from Python code (crafted bytecode, from `marshal` or
`types.CodeType`, can still corrupt memory). The program can patch any module, builtin or global,
so the hook uses none: what it needs is bound as default arguments when it is made (C functions,
frozensets, tuples, strings: nothing mutable, so a signal handler or finalizer that reads its frame
can change nothing), and it runs no code of the program's (a `str` subclass or path-like object is
never asked for its value).

Stdlib only, no `from __future__`: this text runs first in `main.py`.
"""


# The modules a program may not import, and every `_test*` module (_testcapi, ...). The fork
# server reads this assignment (`ast.literal_eval`) so that it never loads one of them ahead.
_ESTUARY_BLOCKED = (
    "_posixsubprocess", "_ctypes", "ctypes", "_ctypes_test", "_xxsubinterpreters",
    "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues", "_tkinter",
    "tkinter",
    # Files opened in C, without an `open` event (read_history_file reads any file, a line
    # at a time); syslog writes to the host's log.
    "readline", "_curses", "_curses_panel", "curses", "_dbm", "_gdbm", "syslog",
)


def _estuary_guard():
    import os
    import sys

    blocked = frozenset(_ESTUARY_BLOCKED)

    def is_blocked(name):
        return any(part in blocked or part.startswith("_test") for part in name.split("."))

    early = sorted(n for n in sys.modules if is_blocked(n))
    if early:
        raise RuntimeError(f"Estuary sandbox guard: {early} were imported before the guard; not running")
    # `subprocess` (which asyncio imports) needs `_posixsubprocess`: it gets this copy, whose
    # fork_exec refuses. The real fork_exec is referenced nowhere else, and no other copy can be
    # made: an import of it is refused, and so is every `_imp.create_builtin` below.
    import _imp
    import _posixsubprocess

    def fork_exec(*args, **kwargs):
        raise PermissionError("_posixsubprocess.fork_exec is not allowed in the Estuary sandbox")

    _posixsubprocess.fork_exec = fork_exec
    # Slow to load, and their modules fall back to pure Python (the fork server loads them once).
    optional = frozenset(("_pickle", "_datetime", "_elementtree", "spwd"))  # spwd: deprecated, warns
    for name in sys.builtin_module_names:
        if name not in sys.modules and name not in optional and not is_blocked(name):
            __import__(name)

    def create_builtin(spec):
        raise ModuleNotFoundError("a built-in module the sandbox did not load is not allowed in the "
                                  "Estuary sandbox")

    _imp.create_builtin = create_builtin

    here = os.path.realpath(os.getcwd())
    libraries = frozenset(os.path.realpath(p) for p in sys.path if p) - {here}
    library_prefixes = tuple(r.rstrip("/") + "/" for r in libraries)
    devices = frozenset(("/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"))
    # The events whose paths are checked: for each path, (its argument, its dir_fd's or None,
    # 0: read (under the folder or a library), 1: written (under the folder), 2: an extension
    # module (under a library), 3: `open`'s, by its flags; relative to the previous path's folder).
    shapes = (
        (frozenset(("open",)), ((0, None, 3, False),)),
        (frozenset(("os.listdir", "os.scandir", "os.listxattr", "os.getxattr", "glob.glob")), ((0, None, 0, False),)),
        (frozenset(("os.chdir", "os.truncate", "os.setxattr", "os.removexattr", "tempfile.mkstemp",
                    "tempfile.mkdtemp", "shutil.chown", "sqlite3.connect")), ((0, None, 1, False),)),
        (frozenset(("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "shutil.rmtree")),
         ((0, -1, 1, False),)),
        (frozenset(("os.rename", "os.link")), ((0, 2, 1, False), (1, 3, 1, False))),
        (frozenset(("os.symlink",)), ((1, 2, 1, False), (0, None, 1, True))),  # (target, link, dir_fd)
        (frozenset(("shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
                    "shutil.unpack_archive")), ((0, None, 0, False), (1, None, 1, False))),
        (frozenset(("shutil.move",)), ((0, None, 1, False), (1, None, 1, False))),
        (frozenset(("shutil.make_archive",)), ((0, None, 1, False), (2, None, 0, False))),
        (frozenset(("glob.glob/2",)), ((0, 3, 0, False), (2, 3, 0, False))),  # (pathname, _, root_dir, dir_fd)
    )
    path_events = frozenset().union(*(names for names, _ in shapes))
    # Raised from Python code, with the caller's objects: the system calls behind them raise their
    # own, checked events, so an argument that is not a plain path or descriptor is let through.
    loose = frozenset(("glob.glob", "glob.glob/2", "tempfile.mkstemp", "tempfile.mkdtemp", "shutil.chown",
                       "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
                       "shutil.copytree", "shutil.unpack_archive", "shutil.move", "shutil.make_archive"))
    denied = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "socket.bind", "socket.connect",
        "socket.sendto", "sqlite3.enable_load_extension", "sqlite3.load_extension",
    ))
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event, args, _here=here, _inside=(here + "/",), _libraries=libraries,
             _library_prefixes=library_prefixes, _devices=devices, _shapes=shapes,
             _path_events=path_events, _loose=loose, _denied=denied, _blocked=blocked,
             _writes=writes, _getcwd=os.getcwd, _lstat=os.lstat, _stat=os.stat,
             _readlink=os.readlink, _type=type, _issubclass=issubclass, _str=str, _bytes=bytes,
             _int=int, _repr=repr, _as_str=str.__str__, _decode=bytes.decode,
             _int_repr=int.__repr__, _Refused=PermissionError, _NoModule=ModuleNotFoundError,
             _OSError=OSError, _ValueError=ValueError, _not=" is not allowed in the Estuary sandbox"):
        # No global, builtin or closure is looked up here, and every local is immutable.
        if event == "import":  # (name, None, sys.path, ...), or (name, file, None, ...) for a .so
            name = args[0]
            if _type(name) is not _str:
                name = _as_str(name)  # a TypeError (refused) if it is no str at all
            for part in name.split("."):
                if part in _blocked or part.startswith("_test"):  # an ImportError: fallbacks work
                    raise _NoModule("import of " + _repr(name) + _not)
            if args[1] is None:
                return
            checks = ((1, None, 2, False),)
        elif event in _path_events:
            for names, checks in _shapes:  # noqa: B007 - the one that matched is used
                if event in names:
                    break
        elif event in _denied or event.startswith("ctypes.") or (event == "socket.sendmsg" and args[1] is not None):
            raise _Refused(event + _not)
        else:
            return
        loose_event = event in _loose
        previous = _here
        for index, fd_index, use, beside_previous in checks:
            path = args[index]
            dir_fd = None if fd_index is None else args[fd_index]
            kind = _type(path)
            if use == 3:
                flags = args[2]
                use = 0 if _type(flags) is _int and (flags & _writes) == 0 else 1
            if kind is _str:
                text = path
            elif kind is _bytes:
                text = path.decode("utf-8", "surrogateescape")
            elif path is None and use != 2:
                continue  # the current folder
            elif _issubclass(kind, _int) and use != 2:
                # A descriptor already open, on a checked path. One changed (fchmod, fchown,
                # ftruncate, futimes, fsetxattr, fchdir) must be on a file in the folder: a library
                # file opened to read (by the uid that owns it, without slot uids) must stay as it is.
                if use != 1 or event == "open":
                    continue
                try:
                    text = _readlink("/proc/self/fd/" + _int_repr(path))
                except _OSError:
                    raise _Refused(event + " of descriptor " + _int_repr(path) + " (not resolved)" + _not) from None
                if not text.startswith("/"):
                    continue  # a pipe, socket or memfd: no file of anyone's
            elif _issubclass(kind, _str):
                text = _as_str(path)  # its characters, as the system call sees them
            elif _issubclass(kind, _bytes):
                text = _decode(path, "utf-8", "surrogateescape")
            elif loose_event:
                continue
            else:
                raise _Refused(event + " of a " + kind.__name__ + " path" + _not)
            if event == "sqlite3.connect" and (text == ":memory:" or text == ""):
                continue
            if ".." in text.split("/"):
                raise _Refused(event + " of " + _repr(text) + " (a '..' in a path)" + _not)
            if event == "sqlite3.connect" and text[:5].lower() == "file:":
                raise _Refused(event + " of a URI" + _not)
            try:
                if text.startswith("/"):
                    full = text
                elif beside_previous:
                    full = previous[:previous.rfind("/")] + "/" + text
                elif dir_fd is None or (_type(dir_fd) is _int and (dir_fd == -1 or dir_fd == -100)):
                    full = _getcwd() + "/" + text
                elif _type(dir_fd) is _int:
                    full = _readlink("/proc/self/fd/" + _int_repr(dir_fd)) + "/" + text
                    if not full.startswith("/"):
                        raise _OSError("not a folder")
                elif loose_event:
                    continue
                else:
                    raise _OSError("not a descriptor")
                previous = full
                # The real path, as os.path.realpath finds it (symbolic links followed, a
                # missing component taken as written).
                done, todo, links = "", (*full.split("/"),), 0
                while todo:
                    name, todo = todo[0], todo[1:]
                    if name == "" or name == ".":
                        continue
                    if name == "..":
                        done = done[:done.rfind("/")]
                        continue
                    step = done + "/" + name
                    try:
                        mode = _lstat(step).st_mode
                    except _OSError:
                        mode = 0
                    if (mode & 0o170000) != 0o120000:
                        done = step
                        continue
                    links += 1
                    if links > 40:
                        raise _OSError("too many links")
                    target = _readlink(step)
                    if target.startswith("/"):
                        done = ""
                    todo = (*target.split("/"), *todo)
            except (_OSError, _ValueError):
                raise _Refused(event + " of " + _repr(text) + " (not resolved)" + _not) from None
            real = done or "/"
            inside = real == _here or real.startswith(_inside)
            library = real in _libraries or real.startswith(_library_prefixes)
            if use == 2 and (inside or not library):
                raise _Refused(event + " of " + _repr(text) + " (an extension module outside the library)" + _not)
            if use == 2 or inside or real in _devices:
                continue
            if use == 1 or not library:
                raise _Refused(event + " of " + _repr(text) + _not)
            if event == "open":  # a descriptor on a folder outside its own would be a dir_fd
                try:
                    folder = (_stat(real).st_mode & 0o170000) == 0o040000
                except _OSError:
                    folder = False
                if folder:
                    raise _Refused(event + " of the folder " + _repr(text) + _not)

    sys.addaudithook(hook)


_estuary_guard()
del _estuary_guard
