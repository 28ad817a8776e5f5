"""`gplr` command line. Core owns the batch commands; the stream and recsys packages add their
own subcommands through the `gplr.commands` entry-point group, so core never imports them.

Each command module exposes `register(subparsers)`, which adds parsers whose `func(args) -> int`
runs the command.
"""
from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gplr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from core import batch_cli, explain_cli  # the batch commands live beside the engine

    batch_cli.register(sub)
    explain_cli.register(sub)  # before the plugins: the stream package adds its topic as a source
    for ep in entry_points(group="gplr.commands"):
        try:
            register = ep.load()
        except ImportError as exc:  # a broken plugin must not take the batch commands down
            logging.getLogger(__name__).warning("gplr: commands from %s unavailable: %s", ep.value, exc)
            continue
        register(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the chosen command. A user error the command did not catch (bad value, missing or
    unreadable file, refused connection) still ends as its message and exit status 2; `-v` shows the
    traceback instead."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("gplr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, LookupError) as exc:
        if getattr(args, "verbose", False):
            raise
        message = str(exc).strip() or type(exc).__name__  # kept whole: a worker's log tail, say
        print(f"gplr {args.command}: {message}\n(-v shows the traceback)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
