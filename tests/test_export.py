"""Export: HF transformers, safetensors, ONNX, TorchScript and tiktoken, with tiny random
models (2 layers, 32 wide) on CPU; each export is checked against our own forward pass.

Needs (requirements-dev.txt): transformers, safetensors, onnx, onnxscript, onnxruntime, tiktoken."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tl  # noqa: F401  (puts train_tinyllm on the path)

from tinyllm_data import *  # noqa: F403  (the tests read like the code they test)
from tinyllm_hub import *  # noqa: F403
from train_tinyllm import *  # noqa: F403

WIDE = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16}
# Characters of every kind the tokenizers must agree on: accents, CJK, emoji (4-byte UTF-8),
# runs of spaces, newlines and tabs, digits, contractions, punctuation, the end-of-text token.
MIXED = ("Hello wörld,  the cat's 日本語の文章 sat\n\n\n on the mat!  12345 67 \t\t x\ty 😀🎉👍🏽 "
         "don't I'll we've they're SHE'D  ümlaut Ωmega ...--- \"quoted\" (parens) [b] {c} <tag/> "
         "x=1+2*3; naïve café 🇺🇳 \r\n tail   \n")


def random_model(vocab: int, seed: int = 0, **settings) -> GPT:
    """A tiny model whose every weight, bias and norm gain is random: a swapped or transposed
    tensor in an export changes the logits instead of hiding behind ones and zeros."""
    cfg = build_config({**WIDE, **settings})
    torch.manual_seed(seed)
    model = GPT(cfg, vocab).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def char_tok() -> TextTokenizer:
    return train_char_tokenizer(MIXED + "abcdefghijklmnopqrstuvwxyz")


@pytest.fixture(scope="module")
def bpe_tok() -> TextTokenizer:
    """Byte-level BPE trained on varied text: Python's docs plus multilingual and emoji lines."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:150_000]
    rng = __import__("random").Random(0)
    extra = "".join(rng.choice(["日本語", "中文字符", "😀", "🎉🎉", "ümlaut ", "  ", "\t", "\n\n", "123",
                                "it's ", "we'll "]) for _ in range(20_000))
    return train_bpe_tokenizer(iter(text_chunks(text + extra)), 700)


# ---------------------------------------------------------------------------------------------
# HuggingFace transformers
# ---------------------------------------------------------------------------------------------

HF_CASES = {
    "gpt2-tied": ({"arch": "gpt2"}, "GPT2LMHeadModel"),
    "gpt2-untied": ({"arch": "gpt2", "tie_weights": False}, "GPT2LMHeadModel"),
    "gpt2-nobias-gqa-hidden": ({"arch": "gpt2", "bias": False, "n_kv_head": 2, "mlp_hidden": 48,
                                "norm_eps": 1e-6}, "GPT2LMHeadModel"),
    "llama-mha-tied": ({"arch": "llama"}, "LlamaForCausalLM"),
    "llama-gqa-untied": ({"arch": "llama", "n_kv_head": 2, "tie_weights": False, "rope_theta": 500.0,
                          "norm_eps": 1e-6}, "LlamaForCausalLM"),
    "llama-mqa": ({"arch": "llama", "n_kv_head": 1}, "LlamaForCausalLM"),
    "llama-bias": ({"arch": "llama", "bias": True, "mlp_hidden": 40}, "LlamaForCausalLM"),
    "llama-head_dim": ({"arch": "llama", "n_kv_head": 2, "head_dim": 12}, "LlamaForCausalLM"),
    "gpt2-gelu_tanh": ({"arch": "gpt2", "mlp": "gelu_tanh"}, "GPT2LMHeadModel"),
    "qwen3-qk_norm-head_dim": ({"arch": "llama", "qk_norm": True, "n_kv_head": 2, "head_dim": 16,
                                "tie_weights": False}, "Qwen3ForCausalLM"),
}


def load_hf(out: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_logits_match(case, char_tok, tmp_path):
    settings, arch = HF_CASES[case]
    model = random_model(char_tok.vocab_size, **settings)
    export_hf(model, char_tok, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == arch
    eps = hf.config.layer_norm_epsilon if arch.startswith("GPT2") else hf.config.rms_norm_eps
    assert eps == model.cfg.norm_eps  # invisible in the logits of a random model
    for shape in ((3, 16), (2, 5)):
        idx = torch.randint(char_tok.vocab_size, shape)
        with torch.no_grad():
            diff = (hf(idx).logits - model(idx)[0]).abs().max().item()
        assert diff < 1e-4, f"{case}: logits differ by {diff}"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    head, embed = hf.get_output_embeddings().weight, hf.get_input_embeddings().weight
    assert ("lm_head.weight" in stored) == (not model.cfg.tie_weights)
    assert (head.data_ptr() == embed.data_ptr()) == model.cfg.tie_weights


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_greedy_generation_matches(arch, char_tok, tmp_path):
    model = random_model(char_tok.vocab_size, seed=1, arch=arch, n_kv_head=2 if arch == "llama" else 0)
    export_hf(model, char_tok, tmp_path)
    hf = load_hf(tmp_path)
    prompt = torch.randint(char_tok.vocab_size, (2, 4))
    greedy = SampleSettings(max_new_tokens=10, temperature=0)
    ours = generate(model, prompt, greedy, stop_ids=char_tok.end_ids)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                             do_sample=False)
    assert torch.equal(ours, theirs)


def test_hf_generation_config_carries_sampling_settings(bpe_tok, tmp_path):
    from transformers import GenerationConfig
    model = random_model(bpe_tok.vocab_size, arch="llama", temperature=0.7, top_k=20, top_p=0.9,
                         repetition_penalty=1.3, max_new_tokens=42)
    export_hf(model, bpe_tok, tmp_path)
    gen = GenerationConfig.from_pretrained(tmp_path)
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (True, 0.7, 20, 0.9)
    assert (gen.repetition_penalty, gen.max_new_tokens) == (1.3, 42)
    assert gen.eos_token_id == gen.bos_token_id == bpe_tok.eot_id
    export_hf(random_model(bpe_tok.vocab_size, arch="gpt2", temperature=0.0), bpe_tok, tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).do_sample is False


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_hf_tokenizer_matches(kind, char_tok, bpe_tok, tmp_path):
    from transformers import AutoTokenizer
    tok = char_tok if kind == "char" else bpe_tok
    export_hf(random_model(tok.vocab_size, arch="gpt2"), tok, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = MIXED + EOT + "after"  # both kinds separate documents with <|endoftext|>
    ids = tok.encode(text)
    assert hf_tok.encode(text) == ids
    assert hf_tok(text)["input_ids"] == ids  # the default call adds no BOS/EOS either
    assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.eos_token == hf_tok.bos_token == EOT
    assert hf_tok.eos_token_id == tok.eot_id


REFUSED = {
    "qk_norm": {"arch": "gpt2", "qk_norm": True},
    "head_dim": {"arch": "gpt2", "head_dim": 16},
    "bias": {"arch": "llama", "qk_norm": True, "bias": True},
    "parallel_block": {"arch": "gpt2", "parallel_block": True},
    "sliding_window": {"arch": "llama", "sliding_window": 4},
    "norm": {"arch": "llama", "norm": "layernorm"},
    "pos_encoding": {"arch": "gpt2", "pos_encoding": "rope"},
    "mlp": {"arch": "llama", "mlp": "gelu"},
    "logit_softcap": {"arch": "llama", "logit_softcap": 30.0},
    "mlp relu2": {"arch": "gpt2", "mlp": "relu2"},
    "unet_skips": {"arch": "llama", "unet_skips": True},
}


@pytest.mark.parametrize("flag", REFUSED)
def test_hf_refuses_what_transformers_cannot_express(flag, char_tok, tmp_path):
    model = random_model(char_tok.vocab_size, **REFUSED[flag])
    with pytest.raises(TinyLLMError, match=flag):
        export_hf(model, char_tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_hf_refuses_a_file_as_directory(char_tok, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TinyLLMError, match="existing file"):
        export_hf(random_model(char_tok.vocab_size, arch="gpt2"), char_tok, tmp_path / "file")


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"arch": "gpt2"},
                                      {"arch": "llama", "n_kv_head": 2, "tie_weights": False},
                                      {"arch": "llama", "qk_norm": True, "sliding_window": 5}],
                         ids=["gpt2-tied", "llama-untied", "llama-switches"])
def test_safetensors_round_trip(settings, bpe_tok, tmp_path):
    model = random_model(bpe_tok.vocab_size, **settings)
    path = tmp_path / "model.safetensors"
    export_safetensors(model, bpe_tok, model.cfg, path)
    loaded = load_safetensors(path)
    vocab_size, tok_str = loaded["vocab_size"], loaded["tokenizer"]
    copy_ = GPT(build_config({}, base=loaded["config"]), vocab_size).eval()
    copy_.load_state_dict(loaded["model"])
    idx = torch.randint(vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(copy_(idx)[0], model(idx)[0])
    assert (copy_.lm_head.weight is copy_.wte.weight) == model.cfg.tie_weights
    assert TextTokenizer.from_str(tok_str).encode(MIXED) == bpe_tok.encode(MIXED)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) == (not model.cfg.tie_weights)


def test_safetensors_refusals(bpe_tok, tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(TinyLLMError, match="no file"):
        load_safetensors(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TinyLLMError, match="not a tinyllm"):
        load_safetensors(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TinyLLMError, match="cannot be read"):
        load_safetensors(tmp_path / "junk.safetensors")
    model = random_model(bpe_tok.vocab_size, arch="llama")
    with pytest.raises(TinyLLMError, match="n_layer"):
        export_safetensors(model, bpe_tok, build_config({**WIDE, "n_layer": 3}), tmp_path / "m.safetensors")


# ---------------------------------------------------------------------------------------------
# ONNX and TorchScript
# ---------------------------------------------------------------------------------------------

# A learned-position model and a rope one, each with the switches that change attention.
GRAPH_CASES = {"learned": {"arch": "gpt2", "parallel_block": True, "n_kv_head": 2},
               "rope": {"arch": "llama", "n_kv_head": 2, "qk_norm": True, "sliding_window": 5}}
# Shapes other than the (2, 8) the graphs are exported at: batch and sequence length both vary.
SHAPES = [(1, 16), (3, 5), (2, 1)]


def test_logits_only_equals_forward():
    for settings in [*GRAPH_CASES.values(), {"arch": "gpt2"}, {"arch": "llama", "sliding_window": 3}]:
        model = random_model(50, **settings)
        idx = torch.randint(50, (2, 16))
        with torch.no_grad():
            assert (LogitsOnly(model)(idx) - model(idx)[0]).abs().max() < 1e-5


@pytest.mark.slow  # torch.export and onnxscript: a compile
@pytest.mark.parametrize("case", GRAPH_CASES)
def test_onnx_matches_pytorch_at_new_shapes(case, tmp_path):
    import onnxruntime
    model = random_model(50, **GRAPH_CASES[case])
    export_onnx(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert session.get_inputs()[0].shape == ["batch", "seq"]
    for shape in SHAPES:
        idx = torch.randint(50, shape)
        logits = session.run(["logits"], {"input_ids": idx.numpy()})[0]
        with torch.no_grad():
            diff = (torch.from_numpy(logits) - model(idx)[0]).abs().max().item()
        assert diff < 1e-4, f"{case} {shape}: {diff}"
    assert model.training is False and next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_torchscript_matches_pytorch_at_new_shapes(case, tmp_path):
    model = random_model(50, **GRAPH_CASES[case])
    export_torchscript(model, tmp_path / "new" / "model.pt")  # the folder is made
    loaded = torch.jit.load(str(tmp_path / "new" / "model.pt"))
    for shape in SHAPES:
        idx = torch.randint(50, shape)
        with torch.no_grad():
            diff = (loaded(idx) - model(idx)[0]).abs().max().item()
        assert diff < 1e-5, f"{case} {shape}: {diff}"


@pytest.mark.slow
def test_torchscript_loads_without_tinyllm(tmp_path):
    model = random_model(50, arch="llama", n_kv_head=1)
    export_torchscript(model, tmp_path / "model.pt")
    idx = torch.randint(50, (3, 7))
    torch.save({"idx": idx, "logits": model(idx)[0].detach()}, tmp_path / "ref.pt")
    script = ("import torch; m = torch.jit.load('model.pt'); r = torch.load('ref.pt'); "
              "print((m(r['idx']) - r['logits']).abs().max().item())")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


# ---------------------------------------------------------------------------------------------
# tiktoken
# ---------------------------------------------------------------------------------------------

def load_encoding(path: Path):
    """The loader that export_tiktoken's docstring tells users to write."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    meta = json.loads(Path(str(path) + ".json").read_text())
    return tiktoken.Encoding(
        name=meta["name"], pat_str=meta["pat_str"], special_tokens=meta["special_tokens"],
        mergeable_ranks=load_tiktoken_bpe(str(path), expected_hash=meta["sha256"]))


@pytest.fixture(autouse=True)
def private_tiktoken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))


def test_byte_level_alphabet_is_hf_alphabet():
    from tokenizers import pre_tokenizers
    chars = byte_level_chars()
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(chars.values()) == list(range(256))


def test_tiktoken_ids_equal_ours(bpe_tok, tmp_path):
    export_tiktoken(bpe_tok, tmp_path / "tok.tiktoken")
    enc = load_encoding(tmp_path / "tok.tiktoken")
    assert enc.n_vocab == bpe_tok.vocab_size
    from pydoc_data.topics import topics
    unseen = "\n\n".join(topics[k] for k in sorted(topics))[150_000:230_000]  # not trained on
    for text in (MIXED, MIXED + EOT + MIXED + EOT, unseen, "   ", "\n", "a  \n\n  b", "😀"):
        ids = bpe_tok.encode(text)
        assert enc.encode(text, allowed_special="all") == ids
        assert enc.decode(ids) == text
    assert enc.encode(EOT, allowed_special="all") == [bpe_tok.eot_id]


def test_tiktoken_export_replaces_a_cached_file(bpe_tok, tmp_path):
    """load_tiktoken_bpe caches by path; the sha256 in the side file makes a re-export visible."""
    small = train_bpe_tokenizer(iter([MIXED * 30]), 300)
    export_tiktoken(small, tmp_path / "tok.tiktoken")
    assert load_encoding(tmp_path / "tok.tiktoken").n_vocab == small.vocab_size
    export_tiktoken(bpe_tok, tmp_path / "tok.tiktoken")
    assert load_encoding(tmp_path / "tok.tiktoken").encode(MIXED) == bpe_tok.encode(MIXED)


def test_tiktoken_refuses_char_level(char_tok, tmp_path):
    with pytest.raises(TinyLLMError, match="char-level"):
        export_tiktoken(char_tok, tmp_path / "tok.tiktoken")
    assert not (tmp_path / "tok.tiktoken").exists()


def test_tiktoken_refuses_merges_it_would_apply_differently(tmp_path):
    """Merges b+c, then a+b, then ab+c: HF makes 'a' 'bc' of "abc" (its merge list has no
    a+bc) while tiktoken would take the whole pre-token "abc" as the token it is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: byte_level_chars()[c])
    vocab = {c: i for i, c in enumerate(alphabet)} | {"bc": 256, "ab": 257, "abc": 258}
    hf = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    tok = TextTokenizer(hf)
    assert [tok.hf.id_to_token(i) for i in tok.encode("abc")] == ["a", "bc"]
    with pytest.raises(TinyLLMError, match="abc"):
        export_tiktoken(tok, tmp_path / "tok.tiktoken")


# ---------------------------------------------------------------------------------------------
# The command line: --export from a trained run, and exports loaded back
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # torch.export and onnxscript: a compile
def test_cli_export_every_format_and_sample_from_safetensors(run_args, tmp_path, capsys):
    assert tl.main(run_args("--tokenizer", "bpe", "--bpe_vocab_size", "300")) == 0
    out = tmp_path / "out"
    for fmt in ("hf", "safetensors", "onnx", "torchscript", "tiktoken"):
        assert tl.main(["--export", fmt, "--out_dir", str(out)]) == 0, fmt
        assert f"as {fmt}:" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(out / "export-hf").eval()
    hf_tok = AutoTokenizer.from_pretrained(out / "export-hf")
    ours = tl.load_for_use(tl.resolve(["--generate_only", "--out_dir", str(out)]))
    ids = ours.tok.encode("the cat sat on")
    assert hf_tok("the cat sat on")["input_ids"] == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (hf(x).logits - ours.model(x)[0]).abs().max() < 1e-4
    args = ["--generate_only", "--prompt", "the cat", "--max_new_tokens", "12", "--seed", "1"]
    assert tl.main([*args, "--out_dir", str(out)]) == 0
    from_ckpt = capsys.readouterr().out
    assert tl.main([*args, "--ckpt", str(out / "export-safetensors" / "model.safetensors")]) == 0
    assert capsys.readouterr().out == from_ckpt  # same weights, same text
    assert tl.main(["--eval_only", "--ckpt", str(out / "export-safetensors" / "model.safetensors"),
                    "--out_dir", str(out)]) == 0


def test_cli_export_refusal_is_one_line(run_args, tmp_path, capsys):
    assert tl.main(run_args("--parallel_block")) == 0
    capsys.readouterr()
    assert tl.main(["--export", "hf", "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --parallel_block has no switch in transformers")
    assert len(err.splitlines()) == 1
    assert tl.main(["--export", "tiktoken", "--out_dir", str(tmp_path / "out")]) == 2
    assert "char-level tokenizer" in capsys.readouterr().err
