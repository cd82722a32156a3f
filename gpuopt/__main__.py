"""The ``gpuopt`` command line: ``python -m gpuopt COMMAND [options]``.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)`` (registering
its options and ``set_defaults(func=run)``) and ``run(args) -> int``. To add one, import its
module and call its ``add_parser`` in :func:`build_parser` below.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, bench, demo, rule_list


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="gpuopt",
        description="Flux.Optimise's optimiser rules as fused CUDA kernels on CuPy, NumPy on the CPU.",
    )
    parser.add_argument("--version", action="version", version=f"gpuopt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.add_parser(subparsers)
    bench.add_parser(subparsers)
    rule_list.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``gpuopt`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Usage errors print argparse's message and return 2 instead of raising SystemExit, so the
    function can be called in-process (tests, notebooks).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (``... | head``): stop quietly, as the Python docs recommend,
        # pointing stdout at devnull so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
