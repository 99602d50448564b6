"""--export gguf, checked by llama.cpp itself through llama-cpp-python: its tokenization of mixed
text equals ours, its logits and greedy continuations equal ours for f32 and f16, and q8_0 stays
close. Tiny random models (2 layers, 32 wide) in every layout the HF export covers.

Needs gguf (requirements-dev.txt) and, for the tests that run llama.cpp, llama-cpp-python
(requirements-llama.txt; it builds llama.cpp from source). Those skip, saying so, without it."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tl  # noqa: F401  (puts train_tinyllm on the path)
from test_export import HF_CASES, MIXED, bpe_tok, char_tok, random_model  # noqa: F401  (fixtures)

from tinyllm_data import *  # noqa: F403  (the tests read like the code they test)
from tinyllm_hub import *  # noqa: F403
from train_tinyllm import *  # noqa: F403

CASES = {name: settings for name, (settings, _) in HF_CASES.items()}  # the HF export's layouts


@pytest.fixture
def llama(monkeypatch):
    """A loader of .gguf files into llama.cpp. Its extra CPU buffer types (AMX kernels, weight
    repacking) are switched off: llama-cpp-python 0.3.36's AMX matmul crashed (SIGSEGV in
    ggml_backend_amx_mul_mat) on every q8_0 model on an AMX Xeon; the plain kernels are what
    every other CPU runs."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                    "pip install -r requirements-llama.txt (builds llama.cpp)")
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)

    def load(path: Path, n_ctx: int = 64):
        # an f32 KV cache (llama.cpp's default is f16), so that f32 weights compute in f32 throughout
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, verbose=False, logits_all=True,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    return load


def export(model: GPT, tok: TextTokenizer, folder: Path, weights: str, cfg: Config | None = None) -> Path:
    path = folder / weights / "model.gguf"
    export_gguf(model, tok, cfg or model.cfg, path, weights)
    return path


def their_tokens(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def their_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # (T, V)


def their_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def our_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), SampleSettings(n, temperature=0.0))[0, len(ids):].tolist()


# ---------------------------------------------------------------------------------------------
# The model: every layout, every weight type
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_computes_what_we_compute(case, char_tok, llama, tmp_path):
    model = random_model(char_tok.vocab_size, **CASES[case])
    ids = char_tok.encode(MIXED)[:model.cfg.block_size]  # (T,) every position of the context
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()  # (T, V)
    scale = float(np.abs(ours).max())
    prompt, n = ids[:3], model.cfg.block_size - 3  # learned positions end at block_size
    # llama.cpp computes GELU through a table of f16 inputs: GPT-2 in f32 is close, not exact
    exact = 1e-3 if CASES[case]["arch"] == "gpt2" else 1e-5
    for weights, tol in (("f32", exact), ("f16", 5e-3), ("q8_0", 8e-2)):
        llm = llama(export(model, char_tok, tmp_path, weights))
        assert their_tokens(llm, MIXED + EOT) == char_tok.encode(MIXED + EOT)
        arch = llm.metadata["general.architecture"]
        context = "256" if arch == "gpt2" else "16"  # learned positions: the table llama.cpp reads
        assert arch == hf_layout(model.cfg) and llm.metadata[f"{arch}.context_length"] == context
        diff = float(np.abs(their_logits(llm, ids) - ours).max())
        assert diff < tol * scale, (weights, diff, scale)
        if weights != "q8_0":  # q8_0's greedy agreement is measured on trained models (README)
            assert their_greedy(llm, prompt, n) == our_greedy(model, prompt, n), weights


@pytest.mark.slow
def test_q8_0_keeps_f16_where_rows_are_not_blocks_of_32(char_tok, llama, tmp_path, capsys):
    model = random_model(char_tok.vocab_size, arch="llama", n_embd=48, n_head=4)  # rows of 48
    llm = llama(export(model, char_tok, tmp_path, "q8_0"))
    assert "tensors stay f16: token_embd.weight, blk.0.attn_q.weight" in capsys.readouterr().out
    ids = char_tok.encode(MIXED)[:16]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(their_logits(llm, ids) - ours).max() < 2e-2 * np.abs(ours).max()


def test_rope_pairs_match_llama_cpp_layout():
    """Head 0 of 2, D=4: rotate-half rows (a0 a1 | b0 b1) become adjacent pairs (a0 b0 a1 b1)."""
    w = torch.arange(8.0).view(8, 1)
    assert rotate_half_to_pairs(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ---------------------------------------------------------------------------------------------
# The tokenizer inside
# ---------------------------------------------------------------------------------------------

def byte_level_bpe(first: Any, text: str, vocab_size: int = 600) -> TextTokenizer:
    """A byte-level BPE whose pre-tokenizer runs `first`, then the byte-level mapping: with a
    Split, as Llama 3's and Qwen2's tokenizer.json have; with Digits, as SmolLM's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    split = isinstance(first, pre_tokenizers.Split)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        first, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer=trainer)
    return TextTokenizer(hf)


TEXTS = [MIXED, ENCODER_PROBE[0], f"one{EOT}two {EOT}\n three", "x  \n\n\t  y", "1234567 89 0.5"]


def split(pattern: str) -> Any:
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_encodes_byte_level_bpe_as_we_do(pre, bpe_tok, llama, tmp_path):
    from tokenizers import pre_tokenizers
    first = {"smollm": pre_tokenizers.Digits(individual_digits=True),
             "llama-bpe": split(LLAMA3_SPLIT_PATTERN), "qwen2": split(QWEN2_SPLIT_PATTERN)}.get(pre)
    tok = bpe_tok if pre == "gpt-2" else byte_level_bpe(first, "\n".join(TEXTS * 20) + MIXED.upper())
    assert gguf_pre_tokenizer(json.loads(tok.to_str())) == pre
    model = random_model(tok.vocab_size + 5, arch="llama")  # rows past the tokenizer: unused tokens
    llm = llama(export(model, tok, tmp_path, "f16"))
    for text in TEXTS:
        assert their_tokens(llm, text) == tok.encode(text), text
    assert llm.detokenize(tok.encode(MIXED)).decode("utf-8") == MIXED


@pytest.mark.slow
def test_a_chat_model_carries_its_template_and_ends_at_the_turn(bpe_tok, llama, tmp_path):
    tok = TextTokenizer.from_str(bpe_tok.to_str())
    tok.hf.add_special_tokens(list(CHATML_TOKENS))
    tok = TextTokenizer(tok.hf)
    model = random_model(tok.vocab_size, arch="llama")
    llm = llama(export(model, tok, tmp_path, "f16"))
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    assert llm.token_eos() == tok.vocab["<|im_end|>"] and llm.token_bos() == tok.eot_id
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MIXED}]
    ids = chat_prompt(tok, CHATML, messages)
    assert their_tokens(llm, tok.decode(ids)) == ids
    modelfile = (tmp_path / "f16" / "Modelfile").read_text()
    assert f'TEMPLATE """{OLLAMA_CHATML}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile


def test_modelfile_of_a_plain_model_carries_the_run_settings(char_tok, tmp_path):
    model = random_model(char_tok.vocab_size, arch="gpt2")
    cfg = dataclasses.replace(model.cfg, temperature=0.5, top_k=20, top_p=0.9, repetition_penalty=1.3,
                              max_new_tokens=77)
    export(model, char_tok, tmp_path, "f16", cfg)
    lines = (tmp_path / "f16" / "Modelfile").read_text().splitlines()
    for line in ["FROM ./model.gguf", 'TEMPLATE """{{ .Prompt }}"""', 'PARAMETER stop "<|endoftext|>"',
                 "PARAMETER num_ctx 16", "PARAMETER num_predict 77", "PARAMETER temperature 0.5",
                 "PARAMETER top_k 20", "PARAMETER top_p 0.9", "PARAMETER repeat_penalty 1.3",
                 "PARAMETER repeat_last_n -1", "PARAMETER min_p 0"]:
        assert line in lines


def test_export_says_where_runtimes_would_differ(char_tok, tmp_path, capsys):
    model = random_model(char_tok.vocab_size, arch="llama", qk_norm=True)
    cfg = dataclasses.replace(model.cfg, system='Say """hi"""')
    export(model, char_tok, tmp_path, "f16", cfg)
    out = capsys.readouterr().out
    assert "outside a char-level vocabulary" in out and "tokenizes as Qwen2" in out
    assert "no SYSTEM" in out and "SYSTEM" not in (tmp_path / "f16" / "Modelfile").read_text()


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming what llama.cpp has no equivalent for
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"arch": "llama", "parallel_block": True}, "--parallel_block has no switch in llama.cpp's"),
    ({"arch": "llama", "sliding_window": 4}, "--sliding_window 4 has no switch in llama.cpp's"),
    ({"arch": "gpt2", "head_dim": 4}, "--head_dim 4 has no switch in llama.cpp's GPT-2"),
    ({"arch": "llama", "mlp": "gelu"}, "the layouts llama.cpp's runs"),
    ({"arch": "llama", "logit_softcap": 30.0}, "--logit_softcap 30.0 has no switch in llama.cpp's"),
    ({"arch": "llama", "unet_skips": True}, "--unet_skips"),
])
def test_refuses_settings_llama_cpp_cannot_run(settings, message, char_tok, tmp_path):
    with pytest.raises(TinyLLMError, match=message):
        export(random_model(char_tok.vocab_size, **settings), char_tok, tmp_path, "f16")
    assert not (tmp_path / "f16" / "model.gguf").exists()


def test_refuses_tokenizers_llama_cpp_would_encode_differently(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    def refused(tok: TextTokenizer, message: str) -> None:
        with pytest.raises(TinyLLMError, match=message):
            export(random_model(tok.vocab_size, arch="llama"), tok, tmp_path, "f16")
    refused(train_char_tokenizer("ab c" + SPM_SPACE), "spells a space with")
    pieces = Tokenizer(models.BPE(byte_fallback=True))
    pieces.pre_tokenizer = pre_tokenizers.Metaspace()
    pieces.add_special_tokens([EOT])
    refused(TextTokenizer(pieces), "not byte-level BPE .* with byte fallback")
    refused(byte_level_bpe(split(r"\p{L}+|\s+|."), "abc def " * 50), "none of the byte-level ones")
    no_eot = Tokenizer.from_str(train_char_tokenizer("abc").to_str().replace(EOT, "x"))
    refused(TextTokenizer(no_eot), "no end-of-text token")
    spec = json.loads(train_bpe_tokenizer(iter(["abc def " * 50]), 300).to_str())
    spec["model"]["ignore_merges"] = True  # whole-word lookup, which llama.cpp's gpt-2 never does
    refused(TextTokenizer.from_str(json.dumps(spec)), "ignore_merges")
    named = train_bpe_tokenizer(iter(["abc def " * 50]), 300)
    named.hf.add_tokens([f"[PAD{named.vocab_size + 1}]"])  # the name of a padding row below
    with pytest.raises(TinyLLMError, match="same text"):
        export(random_model(named.vocab_size + 3, arch="llama"), TextTokenizer(named.hf), tmp_path, "f16")
    assert not (tmp_path / "f16").exists()


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_export_gguf_runs_in_llama_cpp(run_args, llama, tmp_path, capsys):
    assert tl.main(run_args("--tokenizer", "bpe", "--bpe_vocab_size", "300")) == 0
    out = tmp_path / "out"
    assert tl.main(["--export", "gguf", "--gguf_type", "q8_0", "--out_dir", str(out)]) == 0
    assert "as gguf:" in capsys.readouterr().out
    folder = out / "export-gguf"
    assert sorted(p.name for p in folder.iterdir()) == [".tinyllm-export", "Modelfile", "model.gguf"]
    ours = tl.load_for_use(tl.resolve(["--generate_only", "--out_dir", str(out)]))
    llm = llama(folder / "model.gguf")
    assert their_tokens(llm, "the cat sat on the mat") == ours.tok.encode("the cat sat on the mat")
    assert llm.metadata["general.file_type"] == "7"  # q8_0
    assert llm.metadata["general.sampling.sequence"] == "penalties;temperature;top_k;top_p"  # ours
    assert float(llm.metadata["general.sampling.min_p"]) == 0  # llama.cpp's own default is 0.05
    assert tl.main(["--export", "gguf", "--out_dir", str(out)]) == 0  # f16 replaces it
    assert llama(folder / "model.gguf").metadata["general.file_type"] == "1"


def test_cli_gguf_type_needs_export_gguf(run_args, tmp_path, capsys):
    assert tl.main(run_args()) == 0
    capsys.readouterr()
    assert tl.main(["--export", "hf", "--gguf_type", "q8_0", "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --gguf_type is for --export gguf; drop it or add --export gguf"
    assert not (tmp_path / "out" / "export-hf").exists()
