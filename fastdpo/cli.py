"""The ``fastdpo`` command line.

``fastdpo bench`` -- time and peak memory of fastdpo against x-transformers and the floor
(see :mod:`fastdpo.bench`).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench

    parser = argparse.ArgumentParser(prog="fastdpo", description="fastdpo: fused, exact DPO losses")
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "bench",
        help="benchmark fastdpo against x-transformers on this device",
        description=bench.__doc__.split("\n\n")[0],
    )
    bench.add_arguments(p)
    p.set_defaults(run=bench.main_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
