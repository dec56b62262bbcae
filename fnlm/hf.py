"""Hugging Face interop: fnlm's Transformer LM as a transformers `LlamaForCausalLM`, and back.

fnlm's default model is Llama's architecture (pre-norm RMSNorm, RoPE, SwiGLU, no biases; the
head tied to the embeddings or not), so a checkpoint maps onto LlamaForCausalLM's state dict
name for name, with one change: fnlm's RoPE rotates interleaved pairs (x[2i], x[2i+1]) and
Llama's rotates halves (x[i], x[i + Dh/2]), so the rows of q_proj and k_proj are permuted
within each head (as torchtitan's and transformers' Llama converters do).

    hf_config(cfg) -> dict                      # config.json of a LlamaForCausalLM
    to_hf_state_dict(params, cfg) -> {name: Tensor}
    model_config_from_hf(config) -> ModelConfig # config.json (a dict) back; refuses what fnlm lacks
    from_hf_state_dict(state, cfg) -> params    # the inverse of to_hf_state_dict, bitwise
    export_hf(checkpoint, directory, tokenizer_dir)   # the folder transformers loads
    read_hf_folder(directory) -> (cfg, params, tokenizer)   # a Llama folder back (fnlm.run.folder.import_hf
                                                              # writes it as a run folder)

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg)))
    model.load_state_dict(to_hf_state_dict(params, cfg))   # fnlm's logits, in transformers

The library functions need only torch; the folder functions read and write safetensors files
and need the optional extra (`pip install 'fnlm[hf]'`). The tokenizer's side is hf_tokenizer.py.
Shape legend: D d_model, H heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import ModelConfig
from .files import new_folder, read_json
from .model import lm_spec
from .tree import PyTree, flatten, tree_leaves, tree_map, unflatten

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# fnlm parameter name -> LlamaForCausalLM parameter name; {} is the layer index.
NAMES = {
    "token_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.output_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.ffn.w1.weight": "model.layers.{}.mlp.gate_proj.weight",  # SiLU(w1 x) * w3 x
    "layers.{}.ffn.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.ffn.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.ln1.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ln2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "ln_final.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
ROTATED = ("attn.q_proj.weight", "attn.k_proj.weight")  # the projections RoPE acts on
IGNORED_HF_NAMES = ("rotary_emb.inv_freq",)  # a buffer some older exports saved; recomputed from rope_theta

# ModelConfig fields: those a Llama config carries whatever their value (tie_embeddings is its
# tie_word_embeddings), and switches with the one value Llama can express. Any other field (a
# switch added after this table) is accepted only at its default, so a new ablation is refused
# by name until someone maps it.
CARRIED = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "eps",
           "tie_embeddings")
LLAMA_SWITCHES = {
    "remove_rmsnorm": (False, "Llama normalizes with RMSNorm"),
    "use_post_norm": (False, "Llama is pre-norm"),
    "remove_rope": (False, "Llama encodes positions with RoPE"),
    "ffn_type": ("swiglu", "Llama's MLP is SwiGLU"),
    "qk_norm": (False, "Llama does not normalize queries and keys"),
    "logit_soft_cap": (None, "Llama's logits are not capped"),
}


def check_llama_compatible(cfg: ModelConfig) -> None:
    """ValueError naming the first ModelConfig switch that LlamaForCausalLM cannot express."""
    defaults = ModelConfig(**{name: getattr(cfg, name) for name in CARRIED})
    for name, value in cfg.to_dict().items():
        if name in CARRIED:
            continue
        expected, why = LLAMA_SWITCHES.get(name, (getattr(defaults, name), None))
        if value != expected:
            reason = why or "fnlm.hf does not map this switch to a Llama config"
            raise ValueError(f"ModelConfig.{name}={value!r} has no LlamaForCausalLM equivalent ({reason}); "
                             f"only {name}={expected!r} exports to the Hugging Face format")


def hf_config(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json of a LlamaForCausalLM that computes what `cfg` does (LlamaConfig(**it))."""
    check_llama_compatible(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def model_config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Llama config.json's dict; ValueError naming what fnlm cannot compute
    (grouped-query attention, biases, RoPE scaling, another activation, ...)."""
    if not isinstance(config, dict):
        raise ValueError(f"a config is a JSON object, got {type(config).__name__}")
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or (architectures and "LlamaForCausalLM" not in architectures):
        raise ValueError(f"model_type={config.get('model_type')!r}, architectures={architectures!r}: "
                         "fnlm imports only LlamaForCausalLM")
    sizes = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "num_layers",
             "num_attention_heads": "num_heads", "intermediate_size": "d_ff",
             "max_position_embeddings": "context_length"}
    missing = [key for key in sizes if key not in config]
    if missing:
        raise ValueError(f"config lacks {missing}")
    for key in sizes:
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] <= 0:
            raise ValueError(f"config {key} must be a positive integer, got {config[key]!r}")
    heads = config["num_attention_heads"]
    refusals = {
        "num_key_value_heads": (config.get("num_key_value_heads") or heads, heads,
                                "grouped-query attention: fnlm gives every query head its own keys and values"),
        "head_dim": (config.get("head_dim") or config["hidden_size"] // heads, config["hidden_size"] // heads,
                     "fnlm's head dim is hidden_size / num_attention_heads"),
        "attention_bias": (bool(config.get("attention_bias", False)), False, "fnlm's projections have no bias"),
        "mlp_bias": (bool(config.get("mlp_bias", False)), False, "fnlm's projections have no bias"),
        "hidden_act": (config.get("hidden_act", "silu"), "silu", "fnlm's SwiGLU gates with SiLU"),
    }
    for name, (found, expected, why) in refusals.items():
        if found != expected:
            raise ValueError(f"config {name}={found!r} is not supported ({why}); fnlm needs {name}={expected!r}")
    return ModelConfig(
        **{ours: config[theirs] for theirs, ours in sizes.items()},
        rope_theta=_rope_theta(config),
        eps=config.get("rms_norm_eps", 1e-6),  # LlamaConfig's default
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_theta(config: dict[str, Any]) -> float:
    """The base of plain RoPE, from `rope_parameters` (transformers >= 5) or `rope_theta`;
    ValueError for a scaled RoPE (linear, dynamic, yarn, llama3, ...) or a partial rotation."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config rope_type={rope_type!r} is not supported: "
                         "fnlm's RoPE is unscaled (rope_type 'default')")
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise ValueError(f"config partial_rotary_factor={factor!r} is not supported: fnlm rotates the whole head")
    return float(rope.get("rope_theta", config.get("rope_theta", 10_000.0)))


def interleaved_to_halves(weight: Tensor, num_heads: int) -> Tensor:
    """Rows (H*Dh, D) of a q/k projection for interleaved RoPE -> the same for half-split RoPE.

    Within each head, rows (0, 1, 2, 3, ...) become (0, 2, 4, ..., 1, 3, 5, ...): pair i of
    fnlm's rotation, rows 2i and 2i+1, lands on rows i and i + Dh/2, which Llama's rotates by
    the same angle. The same permutation of q and k leaves every q.k unchanged. The result is
    a new contiguous tensor, never a view of `weight`.
    """
    return _transpose_within_heads(weight, (num_heads, -1, 2))


def halves_to_interleaved(weight: Tensor, num_heads: int) -> Tensor:
    """The inverse of interleaved_to_halves: (H*Dh, D) rows (0, Dh/2, 1, Dh/2 + 1, ...) per head."""
    return _transpose_within_heads(weight, (num_heads, 2, -1))


def _transpose_within_heads(weight: Tensor, rows: tuple[int, int, int]) -> Tensor:
    """`weight`'s rows viewed as `rows` (H, a, b), axes a and b swapped, as a new contiguous tensor:
    one copy. (Reshaping the transposed view copies too, except where it can be a view: Dh = 2.)"""
    swapped = weight.unflatten(0, rows).transpose(1, 2)
    return swapped.clone(memory_format=torch.contiguous_format).flatten(0, 2)


def to_hf_state_dict(params: PyTree, cfg: ModelConfig) -> dict[str, Tensor]:
    """fnlm's parameter tree -> LlamaForCausalLM's state dict (new contiguous tensors, same
    dtype and device); ValueError for a model Llama cannot express."""
    check_llama_compatible(cfg)
    state = {}
    for name, leaf in flatten(params).items():
        leaf = leaf.detach()
        state[_rename(name, NAMES)] = (interleaved_to_halves(leaf, cfg.num_heads) if name.endswith(ROTATED)
                                       else leaf.clone(memory_format=torch.contiguous_format))
    if cfg.tie_embeddings:  # transformers' state dict lists the tied matrix under both names
        state[NAMES["lm_head.weight"]] = state[NAMES["token_embeddings.weight"]]
    return state


def from_hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> PyTree:
    """LlamaForCausalLM's state dict -> fnlm's parameter tree of `cfg` (as torch tensors of the
    stored dtype); ValueError naming a missing, unexpected (a bias, say) or misshapen tensor."""
    check_llama_compatible(cfg)
    expected = {name: leaf.shape for name, leaf in flatten(lm_spec(cfg)).items()}
    by_hf_name = {_rename(name, NAMES): name for name in expected}
    if cfg.tie_embeddings and NAMES["lm_head.weight"] in state:  # saved files usually omit the tied copy
        state = dict(state)
        head, embeddings = state.pop(NAMES["lm_head.weight"]), state.get(NAMES["token_embeddings.weight"])
        if embeddings is not None and not torch.equal(head, embeddings):
            raise ValueError("tie_word_embeddings is true, but lm_head.weight differs from model.embed_tokens.weight")
    unexpected = sorted(set(state) - set(by_hf_name) - {n for n in state if n.endswith(IGNORED_HF_NAMES)})
    if unexpected:
        raise ValueError(f"tensor(s) {_short(unexpected)} have no place in fnlm's model "
                         "(a bias, or a layer fnlm does not have)")
    missing = sorted(set(by_hf_name) - set(state))
    if missing:
        raise ValueError(f"the weights lack {_short(missing)}")
    flat = {}
    for hf_name, name in by_hf_name.items():
        leaf = state[hf_name]
        if tuple(leaf.shape) != tuple(expected[name]):
            raise ValueError(f"{hf_name} has shape {tuple(leaf.shape)}, the config implies {tuple(expected[name])}")
        flat[name] = halves_to_interleaved(leaf, cfg.num_heads) if name.endswith(ROTATED) else leaf.clone()
    return unflatten(flat, like=lm_spec(cfg))


def _rename(name: str, table: dict[str, str]) -> str:
    """`name` through a table whose keys may hold one {} layer index."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        layer = parts[1]
        template = ".".join([parts[0], "{}", *parts[2:]])
        return table[template].format(layer)
    return table[name]


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Folders: safetensors, config.json, tokenizer.json.


def export_hf(checkpoint: str | os.PathLike, directory: str | os.PathLike,
              tokenizer_dir: str | os.PathLike) -> Path:
    """Write `checkpoint` (an fnlm checkpoint) and the tokenizer in `tokenizer_dir` (a
    Tokenizer.save folder) as a folder that transformers' AutoModelForCausalLM and
    AutoTokenizer load: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json. The folder appears whole or not at all; an existing non-empty
    `directory` is a FileExistsError. Returns the folder."""
    from .checkpoint import load_checkpoint
    from .hf_tokenizer import EOS_TOKEN, tokenizer_config, tokenizer_json
    from .tokenizer import Tokenizer

    save_file = _safetensors().save_file
    directory = Path(directory)
    tokenizer = Tokenizer.load(tokenizer_dir)  # FileNotFoundError naming a missing folder or file
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.model_config
    check_llama_compatible(cfg)
    if max(tokenizer.vocab) >= cfg.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has ids up to {max(tokenizer.vocab)}, beyond the "
                         f"model's vocab_size {cfg.vocab_size}: is it the tokenizer of {checkpoint}?")
    dtype = tree_leaves(ckpt.params)[0].dtype
    eos_id = tokenizer.encode(EOS_TOKEN)[0] if EOS_TOKEN in tokenizer.special_tokens else None
    files = {
        CONFIG_FILE: hf_config(cfg, eos_token_id=eos_id, dtype=dtype),
        GENERATION_CONFIG_FILE: {"eos_token_id": eos_id, "do_sample": False},
        "tokenizer.json": tokenizer_json(tokenizer),
        "tokenizer_config.json": tokenizer_config(tokenizer, model_max_length=cfg.context_length),
    }
    with new_folder(directory) as staging:
        state = to_hf_state_dict(ckpt.params, cfg)
        if cfg.tie_embeddings:  # one copy on disk, as transformers' save_pretrained writes it
            del state[NAMES["lm_head.weight"]]
        save_file(state, staging / MODEL_FILE, metadata={"format": "pt"})
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return directory


def read_hf_folder(directory: str | os.PathLike) -> tuple[ModelConfig, PyTree, Tokenizer]:
    """(ModelConfig, float32 params, Tokenizer) of a LlamaForCausalLM folder (config.json,
    *.safetensors, tokenizer.json); ValueError names what fnlm cannot compute or tokenize.
    fnlm.run.folder.import_hf writes them as a run folder."""
    from .hf_tokenizer import tokenizer_from_json

    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE)
    try:
        cfg = model_config_from_hf(config)
    except ValueError as error:
        raise ValueError(f"{directory / CONFIG_FILE}: {error}") from None
    tokenizer = tokenizer_from_json(read_json(directory / "tokenizer.json"), where=directory / "tokenizer.json")
    if max(tokenizer.vocab) >= cfg.vocab_size:
        raise ValueError(f"{directory / 'tokenizer.json'} has ids up to {max(tokenizer.vocab)}, "
                         f"beyond the model's vocab_size {cfg.vocab_size}")
    try:
        params = from_hf_state_dict(read_safetensors(directory), cfg)
    except ValueError as error:
        raise ValueError(f"{directory}: {error}") from None
    # fnlm trains float32 parameters (autocast lowers the matmuls); upcasting bf16/fp16 is exact.
    # After from_hf_state_dict's copy, not before: a bf16 file is copied at its size, then upcast
    # once (float() of a float32 copy is that copy).
    return cfg, tree_map(lambda leaf: leaf.float(), params), tokenizer


def read_safetensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of the folder's *.safetensors files (one file, or shards), on the CPU."""
    load_file = _safetensors().load_file
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors weights")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state |= load_file(file)
        except Exception as error:  # safetensors raises its own SafetensorError for a bad file
            raise ValueError(f"{file} is not a readable safetensors file: {error}") from error
    return state


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("the Hugging Face format needs safetensors: pip install 'fnlm[hf]' "
                          "(or uv sync --extra hf)") from None
    return safetensors.torch
