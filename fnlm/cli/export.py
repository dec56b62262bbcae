"""`fnlm export` and `fnlm import-hf`: a checkpoint in formats other tools read, and back.

    fnlm export runs/ts/checkpoints/step_0005000.pt params.npz            # numpy arrays
    fnlm export runs/ts/checkpoints/step_0005000.pt ts-hf --tokenizer tok/  # a transformers folder
    fnlm import-hf ts-hf runs/from-hf      # a LlamaForCausalLM folder -> an fnlm run directory

--format defaults to npz when OUT ends in .npz and to hf otherwise. The hf folder loads with
transformers' AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained (see
fnlm/hf.py); it needs `pip install 'fnlm[hf]'` for safetensors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

FORMATS = ("npz", "hf")


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="write a checkpoint as a numpy .npz or a Hugging Face (transformers) folder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint written by fnlm train")
    export.add_argument("out", type=Path, metavar="OUT", help="the .npz file, or the folder, to write")
    export.add_argument("--format", choices=FORMATS, default=None,
                        help="npz: parameters by dotted name, read by numpy alone; hf: a LlamaForCausalLM "
                             "folder with tokenizer.json (default: npz if OUT ends in .npz, else hf)")
    export.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="with --format hf: the model's tokenizer folder (fnlm train-bpe's output)")
    export.set_defaults(run=run_export)

    imports = subparsers.add_parser(
        "import-hf", help="read a Hugging Face LlamaForCausalLM folder into an fnlm run directory",
        description="Read a LlamaForCausalLM folder (config.json, *.safetensors, a byte-level BPE "
                    "tokenizer.json) into the run directory OUT: OUT/checkpoints/step_0000000.pt for "
                    "`fnlm generate --checkpoint` (with --tokenizer OUT/tokenizer), and OUT/config.json, "
                    "whose 'train' table you edit before fine-tuning with `fnlm train --out OUT --resume`. "
                    "Anything fnlm cannot compute alike (grouped-query attention, biases, "
                    "scaled RoPE, another tokenizer) is refused by name.",
    )
    imports.add_argument("model_dir", type=Path, metavar="DIR", help="the Hugging Face model folder")
    imports.add_argument("out", type=Path, metavar="OUT", help="the run directory to create (absent or empty)")
    imports.set_defaults(run=run_import_hf)


def run_export(args: argparse.Namespace) -> int:
    from ..checkpoint import export_npz
    from ..hf import export_hf

    fmt = args.format or ("npz" if args.out.suffix == ".npz" else "hf")
    if fmt == "npz":
        if args.tokenizer is not None:
            raise ValueError("--tokenizer goes with --format hf; an .npz holds parameters only")
        export_npz(args.checkpoint, args.out)
        return 0
    if args.tokenizer is None:
        raise ValueError("--format hf needs --tokenizer DIR, the model's tokenizer folder "
                         "(to write an .npz instead, name a file ending in .npz or pass --format npz)")
    return _needing_safetensors("fnlm export", lambda: export_hf(args.checkpoint, args.out, args.tokenizer))


def run_import_hf(args: argparse.Namespace) -> int:
    from ..run.folder import import_hf

    return _needing_safetensors("fnlm import-hf", lambda: import_hf(args.model_dir, args.out))


def _needing_safetensors(command: str, work: Callable[[], Path]) -> int:
    """Run `work` and say what it wrote; a missing optional dependency is a setup step to
    print in one line, not a bug's traceback."""
    try:
        written = work()
    except ImportError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0
