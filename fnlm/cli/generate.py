"""`fnlm generate`: complete a prompt with a trained checkpoint, streaming the text as it comes.

    fnlm generate --checkpoint runs/ts/ckpt.pt --tokenizer tok/ --prompt "Once upon a time"
    fnlm generate ... --temperature 0.8 --top-p 0.9 --num-samples 3 --seed 7

The tokenizer directory is one that `fnlm train-bpe` or Tokenizer.save wrote: vocab.json and
merges.txt (GPT-2's format) and special_tokens.json. Sample i draws from its own generator
seeded with seed + i, so any one sample can be reproduced alone with --seed SEED+i
--num-samples 1. A sample stops at the --eos token or after --max-new-tokens. Output is the
prompt and its completion on stdout; notes go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, TextIO


class TextDecoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="complete a prompt with a trained checkpoint", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="PATH", help="a checkpoint written by fnlm train")
    parser.add_argument("--tokenizer", type=Path, required=True, metavar="DIR", help="directory with vocab.json and merges.txt")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens per sample (default 256)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 is greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1] (default 1: off)")
    parser.add_argument("--seed", type=int, default=0, metavar="SEED", help="sample i uses seed + i (default 0)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="completions of the prompt (default 1)")
    parser.add_argument("--eos", default="<|endoftext|>", metavar="TOKEN",
                        help="special token that ends a sample (default <|endoftext|>; '' for none)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="torch device (default cpu)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode over a static KV cache with a torch.compile'd step replayed as a CUDA graph "
                             "(default: on for CUDA devices, where the first sample compiles for a while; "
                             "--no-compile: the dynamic KV cache)")
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    try:
        generate_samples(
            args.checkpoint, args.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, num_samples=args.num_samples,
            eos=args.eos, device=args.device, compile=args.compile, out=sys.stdout, notes=sys.stderr,
        )
    except KeyboardInterrupt:  # stopping a long sample early is normal use: end its line
        print(file=sys.stdout)
        raise
    return 0


def generate_samples(
    checkpoint_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, prompt: str, *,
    max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
    eos: str = "<|endoftext|>", device: str = "cpu", compile: bool | None = None, out: TextIO, notes: TextIO,
) -> None:
    """Write num_samples completions of `prompt` to `out` as they are sampled, notes to `notes`.

    checkpoint_path: a file fnlm train wrote; tokenizer_dir: a folder Tokenizer.save wrote; eos:
    a special token (or a single token) of that tokenizer that ends a sample, '' for none.
    Sample i uses a generator seeded with seed + i. compile: fnlm.decode.generate's (None: on for
    CUDA devices). ValueError/OSError name the argument at fault.
    """
    import torch

    from ..checkpoint import load_checkpoint
    from ..data import resolve_device
    from ..decode import check_temperature, check_top_p, generate_steps
    from ..tokenizer import Tokenizer

    check_temperature(temperature)
    check_top_p(top_p)
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    try:
        device = resolve_device(device)  # "auto" -> a device torch.load understands
    except RuntimeError as error:  # not the checkpoint's fault: say so before loading it
        raise ValueError(f"--device {device}: {error}") from None
    tokenizer = Tokenizer.load(tokenizer_dir)
    if eos and eos not in tokenizer.special_tokens:
        if eos.encode("utf-8") not in tokenizer.vocab.values():
            raise ValueError(f"--eos {eos!r} is not a token of the tokenizer in {tokenizer_dir} (its special "
                             f"tokens: {tokenizer.special_tokens}); pass one of those, or --eos '' for none")
        tokenizer = Tokenizer.load(tokenizer_dir, [*tokenizer.special_tokens, eos])  # one vocabulary token: unsplit
    ckpt = load_checkpoint(checkpoint_path, map_location=device)
    cfg = ckpt.model_config
    if len(tokenizer.vocab) > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer.vocab)} tokens, more than the model's vocab_size "
            f"{cfg.vocab_size}: is it the tokenizer this checkpoint was trained with?"
        )
    eos_id = tokenizer.encode(eos)[0] if eos else None
    if compile is None:
        compile = torch.device(device).type == "cuda"
    if compile:
        print("note: compiling the decode step (torch.compile, once per process and setting)", file=notes)

    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError(f"the prompt is empty; to sample without one, pass --prompt '{eos or '<|endoftext|>'}'")
    if len(prompt_ids) > cfg.context_length:
        print(f"warning: the prompt has {len(prompt_ids)} tokens, more than the model's context of "
              f"{cfg.context_length}; keeping its last {cfg.context_length}", file=notes)
    elif len(prompt_ids) + max_new_tokens > cfg.context_length:
        print(f"note: the model reads at most {cfg.context_length} tokens; past that its window hops "
              f"forward by half a context (fnlm.decode.window_start)", file=notes)

    for sample in range(num_samples):
        if sample:
            out.write("\n")
        if num_samples > 1:
            print(f"=== sample {sample + 1} of {num_samples} (seed {seed + sample}) ===", file=out)
        steps = generate_steps(
            ckpt.params, cfg, [prompt_ids], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_id=eos_id,
            generator=[torch.Generator().manual_seed(seed + sample)], compile=compile, truncate_prompt=True,
        )
        out.write(prompt)
        for piece in stream_text(tokenizer, (step[0] for step in steps if step[0] not in (None, eos_id))):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()


def stream_text(tokenizer: TextDecoder, token_ids: Iterable[int]) -> Iterator[str]:
    """The text of token_ids, piece by piece as they arrive.

    A token may end inside a multi-byte UTF-8 character, which decodes to U+FFFD until the next
    token completes it. So each step decodes all ids so far and holds back trailing U+FFFD; the
    printed text is then always a prefix of the final text, each character printed once, whole.
    """
    ids: list[int] = []
    shown = 0  # characters yielded so far
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids)
        complete = len(text.rstrip("\ufffd"))
        if complete > shown:
            yield text[shown:complete]
            shown = complete
    text = tokenizer.decode(ids)  # what is still held back is really U+FFFD: bytes that never completed
    if len(text) > shown:
        yield text[shown:]
