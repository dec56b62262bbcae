"""`fnlm data download`: the command line over fnlm.download."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..download import BASE_URL_ENV, DATASETS, DownloadError, fetch_dataset

def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="fetch the handout's datasets")
    data.set_defaults(run=lambda args: print_help(data))
    commands = data.add_subparsers(title="data commands", metavar="COMMAND")
    download_parser = commands.add_parser(
        "download",
        help="download TinyStoriesV2-GPT4 or the OpenWebText sample (resumable, verified)",
        description=(
            "Download a dataset's train and valid files into DEST. Interrupted downloads resume from "
            "NAME.part; each file is checked against the manifest's size and sha256 when known, its "
            "computed sha256 is recorded in NAME.sha256.json and re-verified on later runs; .gz files "
            "are gunzipped. Offline? Copy the files into DEST by hand and run this to verify them."
        ),
    )
    add = download_parser.add_argument
    add("dataset", choices=sorted(DATASETS))
    add("--dest", type=Path, default=Path("data"), metavar="DIR", help="default: ./data")
    add("--split", choices=["train", "valid", "all"], default="all", help="default: all")
    add("--base-url", metavar="URL",
        help=f"fetch from URL/NAME instead (default: ${BASE_URL_ENV}, else the dataset's Hugging Face URL)")
    add("--retries", type=int, default=3, metavar="N", help="resume attempts per file (default 3)")
    add("--quiet", action="store_true", help="no progress bars or notes")
    download_parser.set_defaults(run=run_download)


def run_download(args: argparse.Namespace) -> int:
    splits = ("train", "valid") if args.split == "all" else (args.split,)
    try:
        paths = fetch_dataset(
            args.dataset, args.dest, splits=splits, base_url=args.base_url, retries=args.retries,
            verbose=not args.quiet,
        )
    except DownloadError as error:
        print(f"fnlm data download: error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
