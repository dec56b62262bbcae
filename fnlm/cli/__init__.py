"""The `fnlm` command. Each module of this package defines `register(subparsers)`, which adds its
parsers and sets `run(args) -> int`; the library below never sees an argparse Namespace."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import data, demo, export, generate, tokenizer, train

COMMANDS = (demo, tokenizer, train, export, generate, data)  # in the order `fnlm --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnlm", description="A functional language-model stack on torch.func (CS336 assignment 1)."
    )
    parser.add_argument("--version", action="version", version=f"fnlm {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "run"):
        build_parser().print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
