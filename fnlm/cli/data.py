"""`fnlm data download`: the command line over fnlm.download."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..download import BASE_URL_ENV, DATASETS, fetch_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="fetch the handout's datasets")
    data.set_defaults(run=lambda args: print_help(data))
    commands = data.add_subparsers(title="data commands", metavar="COMMAND")
    download_parser = commands.add_parser(
        "download",
        help="download TinyStoriesV2-GPT4 or the OpenWebText sample (resumable, size-checked)",
        description=(
            "Download a dataset's train and valid files into DEST. An interrupted download resumes from "
            "NAME.part only if the server confirms it still serves the same file (If-Range with the ETag or "
            "Last-Modified recorded in NAME.part.json), else it starts over; the bytes received must match "
            "the size the server announced. The manifest pins no sha256 today, so the first download is "
            "trusted: its sha256 is recorded in NAME.sha256.json and re-verified on later runs. .gz files "
            "are gunzipped. Offline? Copy the files into DEST by hand and run this to record them."
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
    paths = fetch_dataset(
        args.dataset, args.dest, splits=splits, base_url=args.base_url, retries=args.retries, verbose=not args.quiet,
    )  # a DownloadError is an OSError: fnlm.cli.main prints it as one line
    for path in paths:
        print(path)
    return 0


def print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
