"""`kvray results`: the latest status of every row of an output prefix."""

from __future__ import annotations

import sys

from ..options import add_storage_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("results", help="the latest status of every row of an output prefix")
    p.add_argument("out", help="the render's output prefix")
    p.add_argument("--status", action="append", help="only rows with this status (repeatable): ok, error, skipped, ...")
    p.add_argument("--save", metavar="URI", help="write the rows as Parquet here instead of printing them")
    p.add_argument("--show", type=int, default=20, help="rows to print (default 20)")
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..io.atomic import write_atomic
    from ..io.layout import latest_results
    from ..io.opening import open_fs
    from ..io.storage_options import parse_storage_options

    fs, root = open_fs(args.out, parse_storage_options(args.storage_option or []))
    table = latest_results(fs, root)
    if table.num_rows == 0:
        print(f"no results under {args.out}", file=sys.stderr)
        return 1
    if args.status:
        table = table.filter(pc.is_in(table.column("status"), value_set=_pa_strings(args.status)))
    counts = table.group_by("status").aggregate([("id", "count")]).to_pylist()
    if table.num_rows == 0:
        print(f"no rows with status {' or '.join(args.status)} under {args.out}")
        return 0
    print(", ".join(f"{c['status']} {c['id_count']}" for c in sorted(counts, key=lambda c: c["status"])))
    if args.save:
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out_fs, path = open_fs(args.save)
        write_atomic(out_fs, path, sink.getvalue().to_pybytes())
        print(f"wrote {table.num_rows} rows to {args.save}")
    else:
        for row in table.slice(0, args.show).to_pylist():
            print(f"{row['id']}\t{row['status']}\t{row['uri'] or row['error']}\t{row['run']}")
    return 0


def _pa_strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())
