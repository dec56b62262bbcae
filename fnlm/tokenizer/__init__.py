"""Byte-level BPE (CS336 handout section 2): training, a streaming Tokenizer, GPT-2's file format.

Imports no torch, so that it starts fast and can run under tight memory limits.
"""

from .tokenizer import Tokenizer
from .train_bpe import train_bpe

__all__ = ["Tokenizer", "train_bpe"]
