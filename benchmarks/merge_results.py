"""Merge a newer benchmark run into a device's results file, row by row.

    python benchmarks/merge_results.py OLD.json NEW.json --key shape,T,scheme --why "decode re-tuned" [--out PATH]

A partial re-run (say `gpu_session.sh k1-decode`: bf16 decode rows only) should replace the rows it
measured and keep the others. Rows of NEW replace the rows of OLD with the same key (the `--key`
fields); OLD's other rows stay. An OLD row without every key field (a per-(shape, T) side row such
as the align timing, a skipped-row note, a row from before a key field existed) goes only where a
NEW row agrees with it on the key fields it has. The merged document takes NEW's header (date,
device, ceilings) and says in `merged` which keys came from which run, with OLD's ceilings and
OLD's own `merged` note, so no figure loses its provenance. Both files must come from the same
device. Default output: NEW's path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import device_name  # noqa: E402


def merge(old: dict[str, Any], new: dict[str, Any], key: list[str], why: str) -> dict[str, Any]:
    if not key:
        raise ValueError("--key: give at least one row field, e.g. shape,T,scheme")
    if device_name(old) != device_name(new):
        raise ValueError(
            f"the files come from different devices: {device_name(old)!r} and {device_name(new)!r}"
        )
    if old.get("what") != new.get("what"):
        raise ValueError(f"the files hold different benchmarks: {old.get('what')!r} and {new.get('what')!r}")

    def k(row: dict[str, Any]) -> tuple | None:
        return tuple(row[f] for f in key) if all(f in row for f in key) else None

    fresh = {k(r) for r in new.get("rows", []) if k(r) is not None}
    if not fresh:
        raise ValueError(f"no row of the new file has every key field {key}")
    new_rows = new.get("rows", [])

    def replaced(row: dict[str, Any]) -> bool:  # a new row agrees on every key field the old one has
        have = [f for f in key if f in row]
        return any(all(f in n and n[f] == row[f] for f in have) for n in new_rows)

    kept = [r for r in old.get("rows", []) if not replaced(r)]
    doc = dict(new)
    doc["rows"] = kept + list(new.get("rows", []))
    doc["merged"] = (
        f"rows for ({', '.join(key)}) in {sorted(fresh, key=str)} from the run of {new.get('date')} ({why}); "
        f"that run's ceilings {new.get('ceilings')}; the other {len(kept)} rows from the file of "
        f"{old.get('date')} (its ceilings {old.get('ceilings')}; its own note: {old.get('merged', '-')})"
    )
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--key", required=True, help="comma-separated row fields that identify a row")
    ap.add_argument("--why", required=True, help="what the new run changed (kept in the merged note)")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: NEW's path)")
    args = ap.parse_args(argv)
    old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    doc = merge(old, new, [f for f in args.key.split(",") if f], args.why)
    out = args.out or args.new
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(
        f"{out}: {len(doc['rows'])} rows ({len(doc['rows']) - len(new.get('rows', []))} kept from {args.old.name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
