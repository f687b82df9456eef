"""The bridge's kernel-visible tables as data: snapshot format, journal records, key encoding.

A snapshot (``NodeFS.dump_state()["bridge"]``) is::

    {"version": 1, "generation": G, "next_nodeid": N, "next_fh": F,
     "nodes": {"nodeid": [key, lookups], ...},    # nodes with nodeids (the kernel's have lookups)
     "handles": {"fh": [nodeid, flags], ...},     # open files, with their open(2) flags
     "dirs": {"fh": nodeid, ...},                 # open directories
     "outcomes": [[request_id, outcome], ...]}    # recent non-idempotent requests, oldest first

Journal records (lists, first item the kind): ``["N", nodeid, key]`` a node got a nodeid,
``["L", nodeid, delta]`` its lookup count changed, ``["O", fh, nodeid, flags]`` /
``["D", fh, nodeid]`` a file / directory was opened, ``["C", fh]`` closed, ``["R", request_id,
outcome]`` a non-idempotent request's answer. Outcomes: ``["e", fp, nodeid]`` an entry,
``["c", fp, nodeid, fh, fopen, backing_id]`` an entry and an open file, ``["ok", fp]``,
``["x", fp, errno]``, where ``fp`` is a 32-bit fingerprint of the request (opcode, nodeids,
names, flags): an outcome answers only a replay of the same request.

Keys are JSON values: ints, strings, None, bools and floats as they are; bytes as
``{"b": base64}``; tuples as ``{"t": [...]}``; frozensets as ``{"s": [...]}``.
"""

from __future__ import annotations

import base64
from collections.abc import Hashable
from typing import Any

from ..resend import NOT_DONE, NotDone, error_code

__all__ = ["KINDS", "NOT_DONE", "NotDone", "decode_key", "encode_key", "error_code", "fold", "new_state"]

#: Journal record kinds of the bridge (a subclass's own records use other first items).
KINDS = frozenset({"N", "L", "O", "D", "C", "R"})
#: Outcomes of non-idempotent requests kept for replays (requests in flight at a crash).
OUTCOMES_KEPT = 4096


def encode_key(key: Hashable) -> Any:
    """``key`` as a JSON value (ValueError for a type that has no encoding)."""
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, bytes):
        return {"b": base64.b64encode(key).decode("ascii")}
    if isinstance(key, tuple):
        return {"t": [encode_key(k) for k in key]}
    if isinstance(key, frozenset):
        return {"s": [encode_key(k) for k in key]}
    raise ValueError(f"a node key must be made of ints, strings, bytes and tuples to be saved, not {key!r}")


def decode_key(value: Any) -> Hashable:
    """The key :func:`encode_key` encoded."""
    if isinstance(value, dict):
        if "b" in value:
            return base64.b64decode(value["b"])
        if "t" in value:
            return tuple(decode_key(v) for v in value["t"])
        return frozenset(decode_key(v) for v in value["s"])
    if isinstance(value, list):  # pragma: no cover - never written, tolerated
        return tuple(decode_key(v) for v in value)
    return value  # type: ignore[no-any-return]


def new_state(generation: int) -> dict[str, Any]:
    """An empty snapshot."""
    return {"version": 1, "generation": generation, "next_nodeid": 2, "next_fh": 1, "nodes": {},
            "handles": {}, "dirs": {}, "outcomes": []}


def fold(state: dict[str, Any], record: list[Any]) -> None:
    """Apply one bridge journal record to a snapshot, in place."""
    kind = record[0]
    if kind == "L":
        n = state["nodes"].get(str(record[1]))
        if n is not None:
            n[1] = max(0, n[1] + record[2])
    elif kind == "N":
        state["nodes"][str(record[1])] = [record[2], 0]
        state["next_nodeid"] = max(state["next_nodeid"], record[1] + 1)
    elif kind == "O":
        state["handles"][str(record[1])] = [record[2], record[3]]
        state["next_fh"] = max(state["next_fh"], record[1] + 1)
    elif kind == "D":
        state["dirs"][str(record[1])] = record[2]
        state["next_fh"] = max(state["next_fh"], record[1] + 1)
    elif kind == "C":
        state["handles"].pop(str(record[1]), None)
        state["dirs"].pop(str(record[1]), None)
    elif kind == "R":
        outcomes = state["outcomes"]
        outcomes.append([record[1], record[2]])
        if len(outcomes) > 2 * OUTCOMES_KEPT:
            del outcomes[: len(outcomes) - OUTCOMES_KEPT]
    else:
        raise ValueError(f"not a bridge journal record: {record!r}")
