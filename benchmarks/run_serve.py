"""Run ``mailflow serve`` in this process, optionally under cProfile.

    python -m benchmarks.run_serve [--profile OUT.prof] -- -c mailflow.yaml

The profile is written when the server stops (SIGTERM), so the benchmark can
profile exactly the load it generated. Same code path as the ``mailflow`` script.
"""

from __future__ import annotations

import argparse
import cProfile
import sys

from benchmarks import what_if
from mailflow.cli import main as mailflow_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="write cProfile stats here on exit")
    parser.add_argument(
        "--what-if",
        action="append",
        default=[],
        help="patch in a proposed change first (see benchmarks/what_if.py); repeatable",
    )
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments for serve")
    args = parser.parse_args(argv)
    serve_args = [a for a in args.serve_args if a != "--"]
    what_if.apply(args.what_if)
    if not args.profile:
        mailflow_main(["serve", *serve_args])
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        mailflow_main(["serve", *serve_args], standalone_mode=False)
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)
    sys.exit(0)


if __name__ == "__main__":
    main()
