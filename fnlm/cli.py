"""The `fnlm` command. Each job's subcommands live beside the code they drive: a module listed
in COMMANDS defines `register(subparsers)`, which adds its parsers and sets `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS: tuple[str, ...] = (  # in the order `fnlm --help` lists them
    "fnlm.demo",
    "fnlm.tokenizer.cli",
    "fnlm.train_cli",
    "fnlm.generate_cli",
    "fnlm.download",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnlm", description="A functional language-model stack on torch.func (CS336 assignment 1)."
    )
    parser.add_argument("--version", action="version", version=f"fnlm {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "run"):
        build_parser().print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
