"""`fnlm export`: a checkpoint's parameters in a format other tools read."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="write a checkpoint's parameters to a numpy .npz",
                                   description="Write a checkpoint's parameters, flattened to dotted names, "
                                               "to an .npz file that numpy reads without torch.")
    export.add_argument("checkpoint", type=Path, help="a checkpoint written by fnlm train")
    export.add_argument("out", type=Path, help="the .npz file to write")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..checkpoint import export_npz

    export_npz(args.checkpoint, args.out)
    return 0
