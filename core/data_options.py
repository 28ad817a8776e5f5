"""The purchases-file options every `gplr` command shares: one `--columns` / `--schema` mapping,
loaded by one function that prints the mapping with the cleaning report and turns a bad file into
one line on stderr (exit 2), never a traceback.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_data_options(p)
>>> p.parse_args(["--columns", "user_id=customer"]).columns
'user_id=customer'
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from core.data import LoadReport, load_purchases, source_options

__all__ = ["add_data_options", "load_data", "COLUMNS_HELP"]

COLUMNS_HELP = ("map your file's columns to the canonical ones, e.g. "
                "user_id=customer,item_id=product_id,item_name=product_name,ts=order_number "
                "(needed: user_id, item_id; optional: ts, item_name, quantity, price, event_id)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    """Add `--columns` and `--schema` (the same mapping, inline or as a YAML/JSON file)."""
    p.add_argument("--columns", metavar="NAME=COLUMN,...", default=None, help=COLUMNS_HELP)
    p.add_argument("--schema", metavar="FILE", default=None,
                   help="the mapping as a YAML/JSON file: {user_id: customer, ...} or "
                        "{columns: {...}, ts_format: '%%Y-%%m-%%d', ts_unit: s}; --columns wins")


def load_data(args: argparse.Namespace, path: str | Path, command: str, fmt: str = "auto",
              require_ts: bool = True, **kw: Any) -> tuple[pd.DataFrame, LoadReport]:
    """Load `path` with the command's mapping; print the mapping and cleaning report to stderr.

    `require_ts=False` for batch commands (rows keep the file's order without a ts column).
    Every user error exits with `gplr COMMAND: reason` (status 2).
    """
    try:
        options = source_options(getattr(args, "columns", None), getattr(args, "schema", None))
        if options and fmt == "online-retail":
            raise ValueError("--columns/--schema describe a table; drop --format online-retail/--paper-filter")
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
        frame, report = load_purchases(path, fmt, require_ts=require_ts, **options, **kw)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        hint = "; map them with --columns NAME=COLUMN,... or --schema FILE" if "missing column" in str(exc) else ""
        raise SystemExit(f"gplr {command}: {_one_line(exc)}{hint}") from None
    print(report.describe(), file=sys.stderr, flush=True)
    if frame.empty:
        raise SystemExit(f"gplr {command}: no purchases left after cleaning ({report.summary()})")
    return frame, report


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
