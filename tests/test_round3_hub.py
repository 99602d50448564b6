"""Round 3 of the hub (issue 26): a GPT-2-layout GGUF that llama.cpp can run past the learned
context without aborting, the chat template of a transformers directory in chat_template.jinja
(read by --init_from, written by --export hf), --init_from a file that is no model, and the HF
export of a char-level tokenizer on a character outside its vocabulary.

Needs (requirements-dev.txt) transformers, safetensors and gguf; the llama.cpp test also needs
llama-cpp-python (requirements-llama.txt) and skips, saying so, without it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, td, th, tl

LETTERS = "abcdefghijklmnopqrstuvwxyz .,!?\n"


def char_tok() -> tl.TextTokenizer:
    return tl.train_char_tokenizer(LETTERS + LETTERS.upper())


def random_model(vocab: int, seed: int = 0, **settings) -> tl.GPT:
    """A tiny model whose every weight, bias and norm gain is random, so that a wrong tensor in an
    export shows in what it computes."""
    cfg = tl.build_config({"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16, **settings})
    torch.manual_seed(seed)
    model = tl.GPT(cfg, vocab).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


# ---------------------------------------------------------------------------------------------
# 8. GPT-2's learned positions in a GGUF: as many as llama.cpp reads
# ---------------------------------------------------------------------------------------------

def test_gpt2_gguf_holds_every_position_llama_cpp_reads(tmp_path, capsys):
    """llama.cpp rounds its context up to a multiple of 256 and reads the position table at
    every position of it; the table must have context_length rows. The learned rows are kept,
    the rest copy the last one, and the export says so."""
    import gguf
    model = random_model(char_tok().vocab_size, arch="gpt2", block_size=32)
    path = tmp_path / "model.gguf"
    th.export_gguf(model, char_tok(), model.cfg, path, "f32")
    assert "the file holds 256 positions: the 32 learned ones" in capsys.readouterr().out
    reader = gguf.GGUFReader(path)
    context = reader.fields["gpt2.context_length"]
    assert int(context.parts[context.data[0]][0]) == 256
    table = next(t for t in reader.tensors if t.name == "position_embd.weight")
    rows = torch.from_numpy(table.data.copy()).reshape(256, 32)
    learned = model.positions.wpe.weight.detach()
    assert torch.equal(rows[:32], learned) and torch.equal(rows[32:], learned[-1:].expand(224, -1))
    assert "PARAMETER num_ctx 32" in (tmp_path / "Modelfile").read_text().splitlines()


def test_rope_gguf_keeps_the_block_size_as_its_context(tmp_path):
    import gguf
    model = random_model(char_tok().vocab_size, arch="llama", block_size=32)
    th.export_gguf(model, char_tok(), model.cfg, tmp_path / "model.gguf", "f16")
    context = gguf.GGUFReader(tmp_path / "model.gguf").fields["llama.context_length"]
    assert int(context.parts[context.data[0]][0]) == 32


LLAMA_CPP_RUN = """
import json, sys
import llama_cpp
default = llama_cpp.llama_cpp.llama_model_default_params
def params():  # the plain CPU kernels, as tests/test_gguf.py's loader (AMX crashed on q8_0 there)
    p = default()
    p.use_extra_bufts = False
    return p
llama_cpp.llama_cpp.llama_model_default_params = params
path, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(path, n_ctx=0, n_threads=1, verbose=False,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
out = []
for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
    out.append(token)
    if len(out) == n:
        break
print(json.dumps({"n_ctx": llm.n_ctx(), "tokens": out}))
"""


@pytest.mark.slow
def test_llama_cpp_generates_past_a_gpt2_models_learned_context(tmp_path):
    """n_ctx=0 (the model's context, raised to 256 by llama.cpp), 48 greedy tokens after a
    4-token prompt: positions up to 51 of a model that learned 32. Before, llama.cpp read past
    the 32-row table and aborted (GGML_ASSERT, SIGABRT), so it runs in a subprocess; within the
    learned context its tokens are still ours."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                        "pip install -r requirements-llama.txt (builds llama.cpp)")
    tok = char_tok()
    model = random_model(tok.vocab_size, seed=1, arch="gpt2", block_size=32)
    path = tmp_path / "model.gguf"
    th.export_gguf(model, tok, model.cfg, path, "f32")
    prompt, n = tok.encode("the "), 48
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP_RUN, str(path), json.dumps(prompt), str(n)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n_ctx"] == 256 and len(result["tokens"]) == n
    within = 32 - len(prompt)  # what the learned positions reach
    ours = tl.generate(model, torch.tensor([prompt]), tl.SampleSettings(within, temperature=0.0))
    assert result["tokens"][:within] == ours[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------
# 14. chat_template.jinja: read by --init_from, written by --export hf
# ---------------------------------------------------------------------------------------------

# Not ChatML (roles in capitals after a colon, the BOS first): a run that renders ChatML instead
# shows at once.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}")
MESSAGES = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]


def instruct_dir(folder: Path, corpus: Path) -> Path:
    """A tiny random Llama and a tokenizer with a chat template, both saved by transformers'
    save_pretrained as a downloaded Instruct model is laid out today: the template in
    chat_template.jinja, none in tokenizer_config.json."""
    import transformers
    tok = tl.train_bpe_tokenizer(iter([corpus.read_text()]), 300)
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token=tl.EOT,
                                                  eos_token="<|im_end|>", chat_template=TEMPLATE)
    hf_tok.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if "chat_template" in config:  # older transformers write it there, and no .jinja file
        (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert (folder / "chat_template.jinja").read_text() == TEMPLATE
    return folder


def rendered(folder: Path, generation_prompt: bool = False) -> str:
    from transformers import AutoTokenizer
    messages = MESSAGES[:1] if generation_prompt else MESSAGES
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_chat_template_jinja_is_read_and_exported_in_both_places(tmp_path, capsys):
    folder = instruct_dir(tmp_path / "hf", make_corpus(tmp_path / "c.txt"))
    theirs = rendered(folder)
    assert theirs.startswith(tl.EOT + "<|im_start|>USER: the cat")
    assert td.render_chat(th.load_source(folder).chat_template, MESSAGES) == theirs
    lines = "".join(json.dumps({"messages": MESSAGES}) + "\n" for _ in range(120))
    (tmp_path / "chat.jsonl").write_text(lines)
    assert tl.main(["--data_path", str(tmp_path / "chat.jsonl"), "--init_from", str(folder), "--out_dir",
                    str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--block_size", "32",
                    "--batch_size", "2", "--max_steps", "2", "--eval_iters", "1", "--sample_interval", "0",
                    "--device", "cpu"]) == 0
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert td.render_chat(ckpt["config"]["chat_template"], MESSAGES) == theirs  # the run's own format
    export = tmp_path / "export"
    assert tl.main(["--export", "hf", "--out_dir", str(tmp_path / "out"), "--export_dir", str(export)]) == 0
    written = (export / "chat_template.jinja").read_text(encoding="utf-8")
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == written
    assert rendered(export) == theirs and rendered(export, True) == rendered(folder, True)
    # a transformers before chat_template.jinja (4.45, the floor) reads tokenizer_config.json alone
    shutil.copytree(export, tmp_path / "old")
    (tmp_path / "old" / "chat_template.jinja").unlink()
    assert rendered(tmp_path / "old") == theirs


def test_the_jinja_file_wins_over_tokenizer_config(tmp_path):
    """As in transformers: a directory with both renders the .jinja file's template."""
    folder = instruct_dir(tmp_path / "hf", make_corpus(tmp_path / "c.txt"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": "{{ messages }}"}))
    assert td.render_chat(th.load_source(folder).chat_template, MESSAGES) == rendered(folder)


# ---------------------------------------------------------------------------------------------
# 18. --init_from a file that is no model; an HF char-level tokenizer on an unseen character
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "empty", "legacy-pickle"])
def test_init_from_a_file_that_is_no_model_is_one_clear_line(kind, run_args, tmp_path, capsys):
    path = tmp_path / ("notes.txt" if kind == "text" else "model.pt")
    if kind == "legacy-pickle":  # torch's format before zip files; no checkpoint of ours is one
        torch.save({"x": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_text("some notes\n" if kind == "text" else "")
    assert tl.main(run_args("--init_from", str(path))) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --init_from {path} is no tinyllm checkpoint (not torch's zip format); "
                   f"--init_from takes a HF model directory (with config.json), a tinyllm checkpoint (.pt) "
                   f"or a .safetensors export")
    assert not (tmp_path / "out").exists()


def test_hf_char_tokenizer_encodes_an_unseen_character_as_end_of_text(tmp_path, capsys):
    """transformers used to fail inside the tokenizers library ("WordLevel error: Missing [UNK]
    token") on any character the vocabulary lacks; now it is the end-of-text token, the
    tokenizer's declared unk_token, and the export says so. In-vocabulary text encodes as ours,
    and the export comes back through --init_from as char-level."""
    from transformers import AutoTokenizer
    tok = char_tok()
    th.export_hf(random_model(tok.vocab_size, arch="gpt2"), tok, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("café 😀 ok")["input_ids"] == [*tok.encode("caf"), tok.eot_id, *tok.encode(" "), tok.eot_id,
                                                 *tok.encode(" ok")]
    assert hf_tok.unk_token == tl.EOT and hf_tok.unk_token_id == tok.eot_id
    assert f"as {tl.EOT} (the tokenizer's unk_token" in capsys.readouterr().out
    text = "Hello, world!\n" + tl.EOT + "again"
    assert hf_tok(text)["input_ids"] == tok.encode(text) and hf_tok.decode(tok.encode(text)) == text
    again = th.source_tokenizer(tmp_path / "hf")
    assert again.kind == "char" and again.unknown_chars("café") == ["é"]
    assert again.to_str() == tok.to_str()
