"""Command line: ``aenet-fn demo`` (also ``python -m aenet_fn demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aenet-fn`` command."""
    parser = argparse.ArgumentParser(
        prog="aenet-fn", description="ænet-type potentials with torch.func"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a potential on the built-in EMT alloy data set")
    demo.add_argument(
        "--structures", type=int, default=80, help="number of structures (default 80)"
    )
    demo.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, split and training")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from aenet_fn.demo import run_demo

        run_demo(args.structures, args.epochs, args.seed, show_progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
