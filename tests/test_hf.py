"""fnlm.hf and fnlm.hf_tokenizer against transformers and tokenizers as oracles, nothing downloaded:
an exported folder loads with the Auto classes and gives fnlm's logits, greedy text and token ids;
import undoes export bitwise; a random LlamaForCausalLM imported gives transformers' logits;
what Llama or fnlm cannot express is refused by name."""

import json
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from fnlm import cli  # noqa: E402
from fnlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fnlm.config import ModelConfig  # noqa: E402
from fnlm.hf import (  # noqa: E402
    export_hf, from_hf_state_dict, halves_to_interleaved, hf_config, interleaved_to_halves,
    model_config_from_hf, to_hf_state_dict,
)
from fnlm.hf_tokenizer import HF_GPT2_PATTERN, tokenizer_from_json, tokenizer_json  # noqa: E402
from fnlm.model import init_params, transformer_lm  # noqa: E402
from fnlm.run.folder import import_hf  # noqa: E402
from fnlm.tokenizer import Tokenizer, train_bpe  # noqa: E402
from fnlm.tree import flatten, tree_map  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|endoftext|><|endoftext|>", "<|im_start|>", "<|日本語|>", "<a b>"]
TEXT = ("Once upon a time, a fox said: «Ça va?» — naïve café, 日本語のテキスト, Ελληνικά, "
        "русский, عربى, 🤖🎉👩‍👩‍👧 and ١٢٣ 4567 numbers.\n\n"
        "  Tabs\tand\r\nnewlines   end<|endoftext|>")
CFG = ModelConfig(vocab_size=300, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48,
                  rope_theta=500.0, eps=1e-6)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on unicode-heavy text, with overlapping and non-ASCII specials."""
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text((TEXT + (FIXTURES / "tinystories_sample.txt").read_text()) * 3, encoding="utf-8")
    vocab, merges = train_bpe(corpus, 290, ["<|endoftext|>"], num_workers=1)
    return Tokenizer(vocab, merges, SPECIALS)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return Tokenizer.from_files(FIXTURES / "gpt2_vocab.json", FIXTURES / "gpt2_merges.txt", SPECIALS)


def hf_tokenizer(tokenizer: Tokenizer) -> "tokenizers.Tokenizer":
    return tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json(tokenizer)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_tokenizer):
    """(checkpoint, tokenizer folder, params): CFG trained for 30 steps of Adam on TEXT."""
    root = tmp_path_factory.mktemp("trained")
    small_tokenizer.save(root / "tok")
    ids = torch.tensor(small_tokenizer.encode(TEXT * 4))
    windows = ids[: len(ids) // 17 * 17].view(-1, 17)  # (N, T + 1)
    params = init_params(CFG, seed=3)
    leaves = list(flatten(params).values())
    for leaf in leaves:
        leaf.requires_grad_(True)
    optimizer = torch.optim.Adam(leaves, lr=1e-2)
    for _ in range(30):
        logits = transformer_lm(params, windows[:, :-1], CFG)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = tree_map(lambda leaf: leaf.detach(), params)
    save_checkpoint(root / "ckpt.pt", model_config=CFG, params=params, step=30)
    return root / "ckpt.pt", root / "tok", params


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    checkpoint, tokenizer_dir, _ = trained
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert cli.main(["export", str(checkpoint), str(out), "--tokenizer", str(tokenizer_dir)]) == 0
    return out


def test_exported_folder_gives_fnlm_logits_and_greedy_text(exported, trained, small_tokenizer):
    _, _, params = trained
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    ids = torch.tensor([small_tokenizer.encode(TEXT)[i : i + 16] for i in (0, 16, 32)])  # (3, T)
    with torch.no_grad():
        expected = transformer_lm(params, ids, CFG)
        assert relative_error(model(ids).logits, expected) < 1e-5

        prompt = ids[:1, :4]
        greedy = prompt
        for _ in range(12):
            next_id = transformer_lm(params, greedy, CFG)[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, next_id], dim=-1)
        hf_greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                   do_sample=False, eos_token_id=None)
    assert hf_greedy.tolist() == greedy.tolist()


def test_exported_config_states_the_architecture(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "rope_theta": 500.0,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 16, "tie_word_embeddings": False,
                "torch_dtype": "float32", "eos_token_id": 0}
    assert {key: config[key] for key in expected} == expected
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == 0
    assert model_config_from_hf(config) == CFG


def test_exported_tokenizer_loads_alone_and_with_auto_tokenizer(exported, small_tokenizer):
    text = TEXT + "<|im_start|>x<|日本語|><a b><|endoftext|><|endoftext|><|endoftext|>"
    expected = small_tokenizer.encode(text)
    assert tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json")).encode(text).ids == expected
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    assert auto(text)["input_ids"] == expected
    assert auto.decode(expected) == text
    assert auto.eos_token == "<|endoftext|>"


@given(pieces=st.lists(st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(SPECIALS)), max_size=8))
def test_tokenizers_gives_fnlm_ids_on_any_text(gpt2_tokenizer, small_tokenizer, pieces):
    text = "".join(pieces)
    for tokenizer in (gpt2_tokenizer, small_tokenizer):
        ids = tokenizer.encode(text)
        hf = _hf_tokenizers(tokenizer)
        assert hf.encode(text).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids)


_HF_TOKENIZERS: dict[int, "tokenizers.Tokenizer"] = {}


def _hf_tokenizers(tokenizer: Tokenizer) -> "tokenizers.Tokenizer":
    """The tokenizers twin of `tokenizer`, built once per tokenizer (GPT-2's takes a second)."""
    if id(tokenizer) not in _HF_TOKENIZERS:
        _HF_TOKENIZERS[id(tokenizer)] = hf_tokenizer(tokenizer)
    return _HF_TOKENIZERS[id(tokenizer)]


def test_unicode_heavy_text_with_specials_inside(gpt2_tokenizer):
    text = ("\x1c\x1d \x85 \u2028 \u00a0a  b ＡＢＣ 🤖<|endoftext|><|endoftext|>don't I'll we've"
            " <|日本語|>日本語 <a b>a b\n\n\n  \t") * 2 + TEXT
    ids = gpt2_tokenizer.encode(text)
    assert _hf_tokenizers(gpt2_tokenizer).encode(text).ids == ids
    assert ids.count(gpt2_tokenizer.encode("<|endoftext|><|endoftext|>")[0]) == 2  # the longest special wins


@pytest.mark.parametrize("name", ["gpt2", "small"])
def test_tokenizer_json_round_trip(gpt2_tokenizer, small_tokenizer, name):
    tokenizer = {"gpt2": gpt2_tokenizer, "small": small_tokenizer}[name]
    back = tokenizer_from_json(json.loads(json.dumps(tokenizer_json(tokenizer))))
    assert back.vocab == tokenizer.vocab and back.merges == tokenizer.merges
    assert back.special_tokens == tokenizer.special_tokens


def test_gpt2_style_byte_level_tokenizer_json_imports(small_tokenizer):
    """tokenizer.json files of GPT-2's kind pre-tokenize with ByteLevel's own regex: fnlm's twin."""
    data = tokenizer_json(small_tokenizer)
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["model"]["merges"] = [merge.split(" ") for merge in data["model"]["merges"]]  # the newer spelling
    back = tokenizer_from_json(data)
    assert back.encode(TEXT) == tokenizers.Tokenizer.from_str(json.dumps(data)).encode(TEXT).ids


def test_import_of_an_export_is_the_original_bitwise(exported, trained, small_tokenizer, tmp_path):
    checkpoint, _, _ = trained
    written = import_hf(exported, tmp_path / "run")
    original, back = load_checkpoint(checkpoint), load_checkpoint(written)
    assert back.model_config == original.model_config and back.step == 0
    assert flatten(back.params).keys() == flatten(original.params).keys()
    for name, leaf in flatten(original.params).items():
        assert torch.equal(flatten(back.params)[name], leaf), name
    tokenizer = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert (tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens) == (
        small_tokenizer.vocab, small_tokenizer.merges, small_tokenizer.special_tokens)


@pytest.mark.slow
def test_imported_run_directory_generates_and_fine_tunes(exported, tmp_path, token_files, capsys):
    run = tmp_path / "run"
    assert cli.main(["import-hf", str(exported), str(run)]) == 0
    assert cli.main(["generate", "--checkpoint", str(run / "checkpoints" / "step_0000000.pt"), "--tokenizer",
                     str(run / "tokenizer"), "--prompt", "Once", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    config = json.loads((run / "config.json").read_text())
    config["train"] |= {"train_data": str(token_files[0]), "val_data": None, "steps": 2, "batch_size": 2,
                        "warmup_steps": 1, "eval_every": 0, "log_every": 1}
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoints" / "step_0000002.pt").step == 2


def test_random_llama_imports_with_transformers_logits(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                      rms_norm_eps=1e-5, rope_theta=1000.0, initializer_range=0.3,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, leaf in model.named_parameters():
            if name.endswith("norm.weight"):  # ones by default: make the gains matter
                leaf.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text(json.dumps(tokenizer_json(small_tokenizer)))

    checkpoint = load_checkpoint(import_hf(tmp_path / "llama", tmp_path / "run"))
    cfg = checkpoint.model_config
    assert (cfg.d_ff, cfg.rope_theta, cfg.eps, cfg.context_length) == (40, 1000.0, 1e-5, 16)
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    assert relative_error(transformer_lm(checkpoint.params, ids, cfg), expected) < 1e-5
    # and the state-dict functions alone, on the live model
    params = from_hf_state_dict(model.state_dict(), cfg)
    assert relative_error(transformer_lm(params, ids, cfg), expected) < 1e-5


def test_tied_embeddings_export_and_import(tmp_path, small_tokenizer):
    cfg = ModelConfig(**(CFG.to_dict() | {"tie_embeddings": True}))
    params = init_params(cfg, seed=5)
    save_checkpoint(tmp_path / "tied.pt", model_config=cfg, params=params, step=0)
    small_tokenizer.save(tmp_path / "tok")
    export_hf(tmp_path / "tied.pt", tmp_path / "hf", tmp_path / "tok")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(model(ids).logits, transformer_lm(params, ids, cfg)) < 1e-5
    back = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "run"))
    assert back.model_config == cfg
    assert all(torch.equal(flatten(back.params)[name], leaf) for name, leaf in flatten(params).items())
    assert from_hf_state_dict(model.state_dict(), cfg).keys() == params.keys()  # lm_head listed too: accepted


def test_rope_permutation_inverts_and_moves_pairs_to_halves():
    weight = torch.arange(2 * 8 * 3).view(16, 3)  # H=2 heads of Dh=8 rows
    halves = interleaved_to_halves(weight, 2)
    assert halves[:, 0].tolist() == [3 * r for r in (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)]
    assert torch.equal(halves_to_interleaved(halves, 2), weight)


@pytest.mark.parametrize("switch, value", [("remove_rmsnorm", True), ("use_post_norm", True), ("remove_rope", True),
                                           ("ffn_type", "silu"), ("ffn_type", "relu2"), ("qk_norm", True),
                                           ("logit_soft_cap", 30.0)])
def test_ablations_llama_cannot_express_are_refused_by_name(switch, value, tmp_path, trained, capsys):
    cfg = ModelConfig(**(CFG.to_dict() | {switch: value}))
    with pytest.raises(ValueError, match=f"ModelConfig.{switch}="):
        hf_config(cfg)
    with pytest.raises(ValueError, match=switch):
        to_hf_state_dict(init_params(cfg), cfg)
    save_checkpoint(tmp_path / "ablated.pt", model_config=cfg, params=init_params(cfg), step=0)
    code = cli.main(["export", str(tmp_path / "ablated.pt"), str(tmp_path / "hf"), "--tokenizer", str(trained[1])])
    err = capsys.readouterr().err
    assert code == 1 and switch in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


LLAMA = hf_config(CFG)


@pytest.mark.parametrize("change, named", [
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type='llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0}}, "rope_type='yarn'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "LlamaForCausalLM"),
])
def test_import_refuses_what_fnlm_cannot_compute_by_name(change, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        model_config_from_hf(LLAMA | change)


def test_import_accepts_transformers_5_rope_parameters():
    config = {key: value for key, value in LLAMA.items() if key not in ("rope_theta", "rope_scaling")}
    assert model_config_from_hf(config | {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}) == CFG


def test_import_refuses_biases_and_missing_tensors_by_name():
    state = to_hf_state_dict(init_params(CFG), CFG)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        from_hf_state_dict(state | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, CFG)
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_hf_state_dict(state, CFG)


@pytest.mark.parametrize("change, named", [
    ({"normalizer": {"type": "NFC"}}, "normalizer NFC"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "pre-tokenizer Metaspace"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}, "not GPT-2's"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}, "add_prefix_space"),
    ({"decoder": {"type": "Metaspace"}}, "decoder Metaspace"),
    ({"post_processor": {"type": "TemplateProcessing"}}, "post_processor TemplateProcessing"),
])
def test_tokenizer_import_refuses_other_pipelines_by_name(small_tokenizer, change, named):
    with pytest.raises(ValueError, match=named):
        tokenizer_from_json(tokenizer_json(small_tokenizer) | change, where="x/tokenizer.json")


@pytest.mark.parametrize("change, named", [
    ({"type": "WordPiece"}, "WordPiece"), ({"byte_fallback": True}, "byte_fallback"),
    ({"vocab": {"▁the": 0, **{chr(0x100 + i): i + 1 for i in range(10)}}}, "not a byte-level vocabulary"),
])
def test_tokenizer_import_refuses_other_models_by_name(small_tokenizer, change, named):
    data = tokenizer_json(small_tokenizer)
    data["model"] |= change
    with pytest.raises(ValueError, match=named):
        tokenizer_from_json(data)


def test_hf_pattern_spelling_matches_gpt2_pattern(gpt2_tokenizer):
    data = tokenizer_json(gpt2_tokenizer)
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = HF_GPT2_PATTERN
    hf = tokenizers.Tokenizer.from_str(json.dumps(data))
    text = TEXT + " don't I'LL 've 's"
    assert hf.encode(text).ids == gpt2_tokenizer.encode(text)


def test_export_refuses_a_non_empty_folder_and_a_missing_tokenizer(trained, tmp_path, capsys):
    checkpoint, tokenizer_dir, _ = trained
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        export_hf(checkpoint, tmp_path / "taken", tokenizer_dir)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert cli.main(["export", str(checkpoint), str(tmp_path / "hf")]) == 1
    assert "--tokenizer" in capsys.readouterr().err
    assert cli.main(["export", str(checkpoint), str(tmp_path / "p.npz")]) == 0  # .npz: today's export


def test_missing_safetensors_is_one_line_naming_the_extra(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    checkpoint, tokenizer_dir, _ = trained
    assert cli.main(["export", str(checkpoint), str(tmp_path / "hf"), "--tokenizer", str(tokenizer_dir)]) == 1
    err = capsys.readouterr().err
    assert "fnlm[hf]" in err and len(err.strip().splitlines()) == 1


def test_state_dict_functions_copy_even_at_head_dim_2():
    # At Dh = 2 the RoPE row permutation is the identity, which a reshape would return as a view.
    cfg = ModelConfig(**(CFG.to_dict() | {"num_heads": CFG.d_model // 2}))
    params = init_params(cfg, seed=3)
    state = to_hf_state_dict(params, cfg)
    back = from_hf_state_dict(state, cfg)

    def storages(tensors):
        return {t.untyped_storage().data_ptr() for t in tensors}

    assert storages(flatten(params).values()).isdisjoint(storages(state.values()))
    assert storages(state.values()).isdisjoint(storages(flatten(back).values()))
    assert all(torch.equal(flatten(back)[name], leaf) for name, leaf in flatten(params).items())
