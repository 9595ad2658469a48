"""`ringmem cache`: list and remove the saved document caches (in-process, no torchrun).

    ringmem cache list [--dir D]               a table: key, tokens, size, last used, model, world
    ringmem cache remove KEY [KEY ...] [--dir D]   a key or an unambiguous prefix of one
    ringmem cache remove --all [--dir D]

The store's root is --dir, else <RINGMEM_CACHE or ~/.cache/ringmem>/doc-caches.
"""
from __future__ import annotations

import argparse
import sys
import time

from .store import DocCacheStore, Entry

SHOWN = 12  # hex digits of a key in the table (remove takes any unambiguous prefix)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # not reached


def table(entries: list[Entry]) -> str:
    """The entries as an aligned text table, most recently used first."""
    rows = [("KEY", "TOKENS", "SIZE", "LAST USED", "MODEL", "WORLD")]
    for e in entries:
        rows.append((e.key[:SHOWN], str(e.tokens), human_bytes(e.bytes),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
                     str(e.fields.get("model_id", "?")), str(e.fields.get("world_size", "?"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 2, 5}  # numbers
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def match(entries: list[Entry], prefix: str) -> Entry:
    """The one entry whose key starts with `prefix`; ValueError when none or several do."""
    p = prefix.lower()
    if not p:
        raise ValueError("KEY must not be empty (use --all to remove every entry)")
    found = [e for e in entries if e.key.startswith(p)]
    if not found:
        raise ValueError(f"no saved document cache has a key starting with {prefix!r}")
    if len(found) > 1:
        keys = ", ".join(e.key[:SHOWN] for e in found)
        raise ValueError(f"key prefix {prefix!r} is ambiguous: it matches {keys}")
    return found[0]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ringmem cache", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="the store's root (default: "
                   "<RINGMEM_CACHE or ~/.cache/ringmem>/doc-caches)")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the saved document caches")
    rm = sub.add_parser("remove", help="remove saved document caches")
    rm.add_argument("keys", nargs="*", metavar="KEY", help="a key or an unambiguous prefix")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    # --dir is accepted after the action too (`ringmem cache list --dir D`)
    for q in (rm, sub.choices["list"]):
        q.add_argument("--dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    store = DocCacheStore(args.dir)
    try:
        if args.action == "list":
            entries = store.entries()
            if not entries:
                print(f"no saved document caches under {store.root}")
                return 0
            print(table(entries))
            total = sum(e.bytes for e in entries)
            print(f"{len(entries)} entries, {human_bytes(total)} under {store.root}")
            return 0
        if args.all == bool(args.keys):
            raise ValueError("give KEY(s) or --all, not both or neither")
        if args.all:
            print(f"removed {store.clear()} entries from {store.root}")
            return 0
        entries = store.entries()
        chosen = [match(entries, k) for k in args.keys]  # all resolved before any removal
        for e in chosen:
            store.remove(e.key)
            print(f"removed {e.key} ({human_bytes(e.bytes)})")
        return 0
    except (ValueError, OSError) as e:
        print(f"ringmem cache: error: {e}", file=sys.stderr)
        return 1
