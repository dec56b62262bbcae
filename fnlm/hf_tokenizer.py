"""fnlm's Tokenizer as a Hugging Face tokenizer.json (and tokenizer_config.json), and back.

    tokenizer_json(tokenizer) -> dict        # tokenizers.Tokenizer.from_str(json.dumps(it)) encodes alike
    tokenizer_config(tokenizer, model_max_length=...) -> dict
    tokenizer_from_json(data, where=...) -> Tokenizer   # refuses what fnlm cannot tokenize alike

The pipeline that gives fnlm's ids: special tokens are added tokens (special, never split,
the leftmost-longest match wins, as in fnlm); no normalizer; a Split pre-tokenizer with fnlm's
GPT-2 regex (each match its own piece) followed by ByteLevel without its own regex (bytes ->
GPT-2's printable characters); a BPE model whose vocabulary is spelled in those characters and
whose merges are fnlm's, in rank order; a ByteLevel decoder; no post-processor (no BOS).

fnlm's regex runs on the `regex` module, tokenizers' on Oniguruma, whose Unicode tables differ
in age: checked on every code point (between letters, digits and spaces), they split alike on
every character that Unicode 14.0 assigns and differ only on some assigned since (Unicode 15+).

One limit of tokenizers' ByteLevel decoder: a special token whose characters all lie in GPT-2's
byte alphabet without being plain ASCII ("<é>") decodes to the wrong text there (its ids are
right); special tokens in ASCII or with any other character ("<|日本語|>") decode as in fnlm.
"""

from __future__ import annotations

import os
from typing import Any

from .tokenizer import Tokenizer
from .tokenizer.gpt2 import text_to_token, token_to_text
from .tokenizer.pretokenize import GPT2_PATTERN

# GPT-2's regex as HF spells it (ByteLevel's built-in regex and many tokenizer.json files);
# it matches exactly what GPT2_PATTERN does.
HF_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
EOS_TOKEN = "<|endoftext|>"  # the end-of-text token of fnlm's tokenizers (and fnlm generate's --eos)


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer.json (a dict to dump) that encodes and decodes as `tokenizer` does."""
    ids = {token: i for i, token in tokenizer.vocab.items()}
    specials = {ids[special.encode("utf-8")]: special for special in tokenizer.special_tokens}
    vocab: dict[str, int] = {}
    for i in sorted(tokenizer.vocab):
        spellings = [token_to_text(tokenizer.vocab[i])]
        if i in specials:  # HF finds an added token's id by its text in the model's vocabulary
            spellings.append(specials[i])
        for spelling in spellings:
            if vocab.setdefault(spelling, i) != i:
                raise ValueError(f"token {i} and token {vocab[spelling]} are both spelled {spelling!r} in "
                                 "tokenizer.json (a special token's text is another token's GPT-2 spelling)")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": special, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, special in sorted(specials.items())
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
                dict(BYTE_LEVEL),  # a copy here and in "decoder": the caller may edit the dict
            ],
        },
        "post_processor": None,
        "decoder": dict(BYTE_LEVEL),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{token_to_text(a)} {token_to_text(b)}" for a, b in tokenizer.merges],
        },
    }


def tokenizer_config(tokenizer: Tokenizer, *, model_max_length: int,
                     eos_token: str = EOS_TOKEN) -> dict[str, Any]:
    """tokenizer_config.json for AutoTokenizer: the generic fast tokenizer over tokenizer.json,
    adding no BOS/EOS and cleaning up no spaces (so its ids and text are fnlm's)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if eos_token in tokenizer.special_tokens:
        config["eos_token"] = eos_token
    return config


def tokenizer_from_json(data: Any, *, where: str | os.PathLike = "tokenizer.json") -> Tokenizer:
    """fnlm's Tokenizer from a tokenizer.json dict: a byte-level BPE pre-tokenized by GPT-2's
    regex; ValueError naming `where` and the part that fnlm cannot reproduce otherwise."""

    def refuse(message: str) -> ValueError:
        return ValueError(f"{where}: {message}")

    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise refuse("not a tokenizers tokenizer.json (no 'model' object)")
    model = data["model"]
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise refuse(f"model type {model.get('type')!r} is not supported: fnlm's tokenizer is a byte-level BPE")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise refuse(f"BPE {option}={model[option]!r} is not supported by fnlm's BPE")
    if model.get("byte_fallback"):
        raise refuse("BPE byte_fallback=true is a SentencePiece-style BPE, not a byte-level one")
    if data.get("normalizer") is not None:
        raise refuse(f"normalizer {_kind(data['normalizer'])} is not supported: fnlm does not normalize text")
    _check_pre_tokenizer(data.get("pre_tokenizer"), refuse)
    if _kind(data.get("decoder")) != "ByteLevel":
        raise refuse(f"decoder {_kind(data.get('decoder'))} is not supported: a byte-level BPE decodes with ByteLevel")
    if _kind(data.get("post_processor")) not in ("None", "ByteLevel"):
        raise refuse(f"post_processor {_kind(data['post_processor'])} is not supported: fnlm's encode adds no tokens")

    added = data.get("added_tokens") or []
    for token in added:
        if not (isinstance(token, dict) and type(token.get("id")) is int and isinstance(token.get("content"), str)
                and token["content"]):
            raise refuse(f"added token {token!r} is not an object with an integer id and a non-empty content")
        flags = [flag for flag in ("single_word", "lstrip", "rstrip") if token.get(flag)]
        if flags:
            raise refuse(f"added token {token.get('content')!r} sets {flags}, which fnlm's special tokens do not have")
    added_text = {token["id"]: token["content"] for token in added}
    vocab: dict[int, bytes] = {}
    for spelling, i in model.get("vocab", {}).items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise refuse(f"the id of {spelling!r} must be a non-negative integer, got {i!r}")
        if added_text.get(i) == spelling:
            continue  # an added token listed under its text (see tokenizer_json)
        try:
            token = text_to_token(spelling)
        except ValueError as error:
            raise refuse(f"not a byte-level vocabulary: {error}") from None
        if vocab.setdefault(i, token) != token:
            raise refuse(f"id {i} is given to two tokens")
    for i, text in added_text.items():
        if vocab.setdefault(i, text.encode("utf-8")) != text.encode("utf-8"):
            raise refuse(f"added token {text!r} has id {i}, which the vocabulary gives to another token")
    merges = [_merge(merge, refuse) for merge in model["merges"]]
    return Tokenizer(vocab, merges, [token["content"] for token in added])


def _check_pre_tokenizer(pre: Any, refuse: Any) -> None:
    """Accept GPT-2's pre-tokenization: ByteLevel with its own regex, or our Split + ByteLevel."""
    steps = pre.get("pretokenizers", []) if _kind(pre) == "Sequence" else [pre]
    kinds = [_kind(step) for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        byte_level = steps[0]
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split, byte_level = steps
        pattern = (split.get("pattern") or {}).get("Regex")
        if pattern not in (GPT2_PATTERN, HF_GPT2_PATTERN) or split.get("behavior") != "Isolated" or split.get("invert"):
            raise refuse(f"pre-tokenizer Split {pattern!r} ({split.get('behavior')}) is not GPT-2's regex, "
                         "the only one fnlm's tokenizer pre-tokenizes with")
    else:
        raise refuse(f"pre-tokenizer {' + '.join(kinds)} is not supported: fnlm needs a byte-level BPE "
                     "pre-tokenized by GPT-2's regex (ByteLevel, or Split + ByteLevel)")
    if byte_level.get("add_prefix_space"):
        raise refuse("pre-tokenizer ByteLevel add_prefix_space=true is not supported: fnlm adds no space")


def _merge(merge: Any, refuse: Any) -> tuple[bytes, bytes]:
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise refuse(f"merge {merge!r} is not two tokens")
    try:
        return text_to_token(parts[0]), text_to_token(parts[1])
    except ValueError as error:
        raise refuse(f"merge {merge!r}: {error}") from None


def _kind(part: Any) -> str:
    return str(part.get("type")) if isinstance(part, dict) else str(part)
