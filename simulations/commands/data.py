"""``fedshop data``: check a merchant's event file, or import it into the canonical table.

``validate`` reads and checks without writing anything; ``import`` writes the validated
table to a Parquet file atomically, so a failed import leaves the destination untouched.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.events import (
    DEFAULT_MAX_BYTES,
    import_events,
    parse_mapping,
    read_events,
    summarize,
)
from simulations.cli import check_output_file

MIB = 1024 * 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="validate or import merchant event files",
        description="Check a merchant's event file against the schema (docs/data.md), or "
        "import it as the canonical Parquet table; errors name the file, row and column.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    validate = actions.add_parser(
        "validate",
        help="check an event file and print a summary",
        description="Read and check the whole file and print rows, merchants, customers, "
        "products and the time range; writes nothing.",
    )
    _add_common(validate)
    validate.set_defaults(handler=run_validate)

    importer = actions.add_parser(
        "import",
        help="validate an event file and write it as Parquet",
        description="Check the whole file, then write the canonical table to --out "
        "atomically: after any error the destination is as it was.",
    )
    _add_common(importer)
    importer.add_argument("--out", required=True, help="destination .parquet file")
    importer.add_argument(
        "--merchant-id", default=None, help="merchant id for a file without a merchant_id column"
    )
    importer.set_defaults(handler=run_import)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .csv, .csv.gz or .parquet event file")
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="SRC=FIELD",
        help="rename a source column to a schema field (FIELD '-' drops the column)",
    )
    parser.add_argument(
        "--max-mb",
        type=float,
        default=DEFAULT_MAX_BYTES / MIB,
        help="refuse files larger than this many MiB (default %(default).0f)",
    )
    parser.add_argument(
        "--max-rows", type=int, default=None, help="refuse files with more data rows than this"
    )


def _limits(args: argparse.Namespace) -> tuple[int, int | None]:
    if not (args.max_mb > 0 and math.isfinite(args.max_mb)):
        raise ConfigError(f"--max-mb must be a finite number > 0, got {args.max_mb}")
    if args.max_rows is not None and args.max_rows < 1:
        raise ConfigError(f"--max-rows must be >= 1, got {args.max_rows}")
    return int(args.max_mb * MIB), args.max_rows


def run_validate(args: argparse.Namespace) -> int:
    max_bytes, max_rows = _limits(args)
    frame = read_events(
        args.file, mapping=parse_mapping(args.map), max_bytes=max_bytes, max_rows=max_rows
    )
    print(f"{args.file}: valid")
    for line in summarize(frame).lines():
        print(f"  {line}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    max_bytes, max_rows = _limits(args)
    check_output_file(Path(args.out), "--out")
    report = import_events(
        args.file,
        args.out,
        mapping=parse_mapping(args.map),
        max_bytes=max_bytes,
        max_rows=max_rows,
        merchant_id=args.merchant_id,
    )
    print(f"imported {report.source} -> {report.destination} ({report.bytes_written:,} bytes)")
    for line in report.summary.lines():
        print(f"  {line}")
    return 0
