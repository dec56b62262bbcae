"""The `fnlm` command. Each module of this package defines `register(subparsers)`, which adds its
parsers and sets `run(args) -> int`; the library below never sees an argparse Namespace.

One error policy for every command (`main`): the library raises ValueError for a bad value or a
bad file and OSError for a file it cannot read or write, each naming the flag, file or value at
fault; those print one line `fnlm COMMAND: error: MESSAGE` and exit 1. Library warnings print
one line `fnlm COMMAND: warning: MESSAGE`. Ctrl-C exits 130; a closed output pipe exits 141
quietly. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator

from .. import __version__
from . import data, demo, export, generate, tokenizer, train

COMMANDS = (demo, tokenizer, train, export, generate, data)  # in the order `fnlm --help` lists them
DEBUG_ENV = "FNLM_DEBUG"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT
EXIT_BROKEN_PIPE = 141  # and for SIGPIPE

EPILOG = (
    "An ordinary mistake (a missing file, a bad value) prints one line naming it and exits 1; "
    f"Ctrl-C exits 130. Set {DEBUG_ENV}=1 to get the full traceback of such an error instead."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnlm", description="A functional language-model stack on torch.func (CS336 assignment 1).",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"fnlm {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    for command in _subcommands(parser):
        command.set_defaults(command=command.prog)  # the innermost one parsed wins: "fnlm data download"
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(f"{args.command}: warning: {message}", file=sys.stderr)
        try:
            return int(args.run(args) or 0)
        except KeyboardInterrupt:
            print(f"{args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # the reader left (`fnlm generate ... | head`): stop quietly, as cat does
            _detach_stdout()
            return EXIT_BROKEN_PIPE
        except (ValueError, OSError) as error:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(f"{args.command}: error: {error_message(error)}", file=sys.stderr)
            return EXIT_ERROR


def error_message(error: ValueError | OSError) -> str:
    """The message of an error, for an OSError from the system without the "[Errno 2]" prefix
    and with the file it names: "No such file or directory: data/x.txt"."""
    if isinstance(error, OSError) and error.strerror:
        names = [os.fsdecode(name) for name in (error.filename, error.filename2) if name is not None]
        return ": ".join([error.strerror, " -> ".join(names)] if names else [error.strerror])
    return str(error)


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (a test's capture)
        pass


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below `parser`, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases repeat a parser
                yield sub
                yield from _subcommands(sub)


if __name__ == "__main__":
    sys.exit(main())
