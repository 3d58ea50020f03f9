"""The untrusted half of a code verdict: loads `solution.py` in the sandbox and answers calls.

This file is copied into the sandbox as `main.py` and run as `main.py RFD WFD`: it reads one JSON
line per call from RFD and writes one JSON line per reply to WFD. It never sees a test or an
expected value, only the arguments of each call; the trusted side (`environments.isolated_tests`)
runs the tests and imports `encode`/`decode` from here, so both sides speak the same plain data.

Wire format (one JSON object per line):

    worker -> parent  {"load": "ok", "names": [...]} | {"load": "syntax" | "error", "error": str}
    parent -> worker  {"call": name, "args": [...], "kwargs": {...}}
    worker -> parent  {"ok": value, "mutated": {index: value}} | {"raised": type name,
                      "message": str, "base": bool} | {"unplain": what}

Values are JSON with tagged objects for what JSON lacks: {"t": "tuple" | "set" | "frozenset" |
"dict" | "bytes" | "complex" | "range" | "iter", "v": ...}. Everything in this process is
reachable by the solution (it can patch this code, `json`, `os`), so nothing it sends is
believed beyond being a plain value: `decode` rebuilds builtin objects only.

Stdlib only and no `from __future__` (a prelude may be prepended to this file).
"""

import collections
import json
import os
import sys
import types

MAX_DEPTH = 48
MAX_ITEMS = 100_000  # iterator results are materialised up to this many items
# Keys of one set or dict that may share a hash. Building a set of n keys with one hash costs n**2
# comparisons, holding the GIL: a reply of 40,000 multiples of 2**61 - 1 (ints that all hash to 0)
# froze the trusted process for 11 s. A 1 MiB reply at this bound costs it under 0.1 s, and honest
# values come nowhere near it (-1 and -2 share a hash; 2**k ints share one per 61 values of k).
MAX_SAME_HASH = 256
_DICTS = (dict, collections.OrderedDict, collections.defaultdict, collections.Counter)
_ITERATORS = (types.GeneratorType, map, filter, zip, enumerate, reversed, type(iter([])),
              type(iter(())), type(iter("")), type(iter(range(0))), type({}.items().__iter__()))


class Unplain(TypeError):
    """A value that cannot cross to the trusted side as plain data."""


def _namedtuple(value) -> bool:
    cls = type(value)
    return isinstance(value, tuple) and hasattr(cls, "_fields") and cls.__eq__ is tuple.__eq__


def encode(value, depth: int = 0):
    """A JSON-ready form of a plain value; raises Unplain for anything else (objects, subclasses)."""
    if depth > MAX_DEPTH:
        raise Unplain(f"a value nested more than {MAX_DEPTH} deep")
    cls, down = type(value), depth + 1
    if value is None or cls in (bool, int, float, str):
        return value
    if cls is list:
        return [encode(v, down) for v in value]
    if cls is tuple or _namedtuple(value):
        return {"t": "tuple", "v": [encode(v, down) for v in value]}
    if cls in _DICTS:
        return {"t": "dict", "v": [[encode(k, down), encode(v, down)] for k, v in dict.items(value)]}
    if cls in (set, frozenset):
        return {"t": cls.__name__, "v": [encode(v, down) for v in value]}
    if cls in (bytes, bytearray):
        return {"t": "bytes", "v": bytes(value).hex()}
    if cls is complex:
        return {"t": "complex", "v": [value.real, value.imag]}
    if cls is range:
        return {"t": "range", "v": [value.start, value.stop, value.step]}
    if cls in _ITERATORS:
        items = []
        for item in value:
            if len(items) >= MAX_ITEMS:
                raise Unplain(f"an iterator of more than {MAX_ITEMS} items")
            items.append(encode(item, down))
        return {"t": "iter", "v": items}
    raise Unplain(f"a {cls.__qualname__} object")


def decode(obj, depth: int = 0):
    """Builtin objects from `encode`'s output (as `json.loads` gives it); ValueError otherwise."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    cls, down = type(obj), depth + 1
    if obj is None or cls in (bool, int, float, str):
        return obj
    if cls is list:
        return [decode(v, down) for v in obj]
    if cls is not dict or set(obj) != {"t", "v"}:
        raise ValueError(f"not plain data: {cls.__name__}")
    tag, v = obj["t"], obj["v"]
    try:
        if tag == "bytes":
            return bytes.fromhex(v)
        if tag == "complex":
            return complex(float(v[0]), float(v[1]))
        if tag == "range":
            return range(*(int(x) for x in v))
        items = [decode(x, down) for x in v]
        if tag == "tuple":
            return tuple(items)
        if tag == "iter":
            return iter(items)
        if tag in ("set", "frozenset"):
            _few_collisions(items, tag)
            return (set if tag == "set" else frozenset)(items)
        if tag == "dict":
            pairs = [_pair(p) for p in items]
            _few_collisions([k for k, _ in pairs], tag)
            return dict(pairs)
    except (TypeError, IndexError, OverflowError, AttributeError) as e:
        raise ValueError(f"malformed {tag!r} value: {e}") from None
    raise ValueError(f"unknown tag {tag!r}")


def _few_collisions(keys: list, tag: str) -> None:
    """ValueError when more than MAX_SAME_HASH of `keys` share a hash (a hash-flooding value);
    TypeError for a key that has none. Linear: a hash per key, and no comparisons."""
    counts = collections.Counter(map(hash, keys))
    most = max(counts.values(), default=0)
    if most > MAX_SAME_HASH:
        raise ValueError(f"a {tag} of {len(keys)} keys, {most} of them with one hash (more than "
                         f"{MAX_SAME_HASH}: a hash-collision flood)")


def _pair(item):
    if type(item) is not list or len(item) != 2:
        raise TypeError("a dict item is not a pair")
    return item[0], item[1]


# -- the worker loop (runs only in the sandbox) ------------------------------------------------
def _call(namespace: dict, request: dict) -> dict:
    fn = namespace.get(request["call"])
    args = [decode(a) for a in request["args"]]
    kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
    try:
        if not callable(fn):
            raise NameError(f"name {request['call']!r} is not defined by the solution")
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported as data; the parent decides
        return {"raised": type(e).__name__, "message": str(e)[:300],
                "base": not isinstance(e, Exception)}
    try:
        reply = {"ok": encode(result)}
        # In-place changes to mutable arguments travel back (tests that sort a list in place).
        mutated = {i: encode(a) for i, a in enumerate(args) if type(a) in (list, dict, set)
                   and encode(a) != request["args"][i]}
    except (Unplain, ValueError, RecursionError) as e:
        return {"unplain": str(e)[:200]}
    if mutated:
        reply["mutated"] = mutated
    return reply


def main() -> None:
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    reader, write = os.fdopen(rfd, "rb"), os.write

    def send(message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[write(wfd, data):]

    namespace = {"__name__": "__solution__"}
    try:
        with open("solution.py") as f:
            code = compile(f.read(), "solution.py", "exec")
    except (SyntaxError, ValueError) as e:
        return send({"load": "syntax", "error": repr(e)[:500]})
    try:
        exec(code, namespace)  # noqa: S102 - this is the sandbox
    except BaseException as e:  # noqa: BLE001
        return send({"load": "error", "error": f"{type(e).__name__}: {e}"[:500],
                     "base": not isinstance(e, Exception)})
    send({"load": "ok", "names": sorted(k for k, v in namespace.items() if callable(v))})
    for line in reader:
        send(_call(namespace, json.loads(line)))


if __name__ == "__main__":
    main()
