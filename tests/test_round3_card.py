"""Reliability round three, the card's part: text that is not UTF-8, one rule for what ends a
reply, true lines after failed checkpoint writes, commas in file names, a chat template on plain
text, impossible MFU figures, a train/val split that does not depend on where the corpus lives,
and flags that a mode would ignore."""

import errno
import json
import os
import random
import shutil
import urllib.request

import pytest
import torch
from conftest import TINY, make_corpus, serving, th, tl


def chat_records(n: int = 120) -> list[dict]:
    rng = random.Random(0)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice("abc") for _ in range(3))},
                          {"role": "assistant", "content": rng.choice(["yes", "no"])}]} for _ in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    assert tl.main(["--data_path", str(make_corpus(folder / "c.txt")), "--out_dir", str(folder / "out"),
                    "--cache_dir", str(folder / "cache"), "--tokenizer", "bpe", "--bpe_vocab_size", "300",
                    *TINY, "--max_steps", "2"]) == 0
    return folder / "out"


def test_bytes_that_are_not_utf8_are_refused_in_one_line_by_bpe_models(bpe_run, capsys):
    capsys.readouterr()
    prompt = b"Once \xff upon".decode("utf-8", "surrogateescape")  # what Python makes of such argv
    assert tl.main(["--generate_only", "--out_dir", str(bpe_run), "--prompt", prompt]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --prompt is not UTF-8 text (byte 0xff at character 5); give it as UTF-8"
    tok = tl.TextTokenizer.from_str((bpe_run / "tokenizer.json").read_text())
    with pytest.raises(tl.TinyLLMError, match="U\\+D800"):
        tl.check_known_chars(tok, "a\ud800b", "the prompt")  # a JSON "\ud800" escape


@pytest.fixture(scope="module")
def ender(tmp_path_factory):
    """A chat model whose every next token is <|im_end|>: GPT-2 blocks, untied head, the final
    norm's output fixed (zero gain, a bias) and the head's row of <|im_end|> along it."""
    folder = tmp_path_factory.mktemp("ender")
    assert tl.main(["--data_path", str(write_jsonl(folder / "c.jsonl", chat_records())),
                    "--out_dir", str(folder / "out"), "--cache_dir", str(folder / "cache"), *TINY,
                    "--block_size", "32", "--arch", "gpt2", "--no-tie_weights", "--max_steps", "1",
                    "--max_new_tokens", "6"]) == 0
    ckpt = torch.load(folder / "out" / "ckpt.pt", weights_only=True)
    tok = tl.TextTokenizer.from_str(ckpt["tokenizer"])
    end = tok.vocab["<|im_end|>"]
    weights = ckpt["model"]
    weights["norm_f.weight"].zero_()
    weights["norm_f.bias"].fill_(1.0)
    weights["lm_head.weight"].zero_()
    weights["lm_head.weight"][end] = 1.0
    torch.save(ckpt, folder / "out" / "ckpt.pt")
    (folder / "out" / "ckpt_best.pt").unlink()
    return folder / "out", tok


def test_a_chat_model_stops_at_its_end_of_turn_in_every_mode(ender, tmp_path, capsys):
    out, tok = ender
    assert tok.end_ids == [tok.eot_id, tok.vocab["<|im_end|>"]]
    capsys.readouterr()
    assert tl.main(["--generate_only", "--out_dir", str(out), "--prompt", "ab", "--num_samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "<|im_end|>" not in printed and printed == "--- sample 1/2 ---\nab\n--- sample 2/2 ---\nab\n"
    use = tl.load_for_use(tl.resolve(["--generate_only", "--out_dir", str(out)]))
    ids = tl.generate(use.model, torch.tensor([tok.encode("ab")]), tl.SampleSettings(6, temperature=0),
                      stop_ids=tok.end_ids)
    assert ids[0, 2:].tolist() == [tok.vocab["<|im_end|>"]]  # one token, then the reply is over
    # /v1/completions on a rendered prompt ends where /v1/chat/completions does
    with serving(out) as server:
        with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as response:
            name = json.load(response)["data"][0]["id"]
        body = json.dumps({"model": name, "prompt": "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n",
                           "max_tokens": 5, "temperature": 0}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            choice = json.load(response)["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "stop"
    # the exports stop at the same tokens
    cfg = tl.build_config({"chat_template": tl.CHATML})
    assert th.hf_generation_config(cfg, tok)["eos_token_id"] == tok.end_ids


def fail_writes_after(monkeypatch, n: int) -> None:
    """torch.save raises OSError(EACCES) from its n+1-th call on: a folder that became read-only
    (CI runs as root, where chmod stops no write)."""
    real, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] > n:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)


def test_after_checkpoint_writes_fail_every_line_says_what_is_on_disk(run_args, monkeypatch, tmp_path,
                                                                      capsys):
    fail_writes_after(monkeypatch, 2)  # the first evaluation (step 3) writes both files, then none
    assert tl.main(run_args("--max_steps", "9", "--learning_rate", "1e-2")) == 0
    out = capsys.readouterr().out
    evals = [line for line in out.splitlines() if line.startswith("eval step")]
    assert "saved to ckpt_best.pt" in evals[0]
    assert not any("saved to ckpt_best.pt" in line for line in evals[1:])
    assert any("not saved: could not write ckpt_best.pt" in line for line in evals[1:])
    done = next(line for line in out.splitlines() if line.startswith("done:"))
    assert "checkpoints in" not in done
    latest = tmp_path / "out" / "ckpt.pt"
    assert done.endswith(f"the checkpoint could not be written: {latest} is from step 3, ckpt_best.pt from "
                         f"step 3")
    assert f"continue with: --out_dir {tmp_path / 'out'} --resume" in out
    ckpt = tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["best_step"] == 3
    assert ckpt["best_val_loss"] == tl.load_checkpoint(tmp_path / "out" / "ckpt_best.pt")["best_val_loss"]


def test_a_file_name_with_a_comma_is_taken_whole(tmp_path, capsys):
    odd = make_corpus(tmp_path / "stories, part 1.txt")
    other = make_corpus(tmp_path / "other.txt", 50)
    assert tl.resolve_data_path(str(odd)) == [odd]
    assert tl.resolve_data_path(f"{other},{odd}") == [other, odd]
    assert tl.resolve_data_path(f"{odd},{other}") == [odd, other]
    with pytest.raises(tl.TinyLLMError, match="separated by commas; a name that holds a comma is taken"):
        tl.resolve_data_path(f"{other},{tmp_path / 'missing, one.txt'}")
    cfg = tl.build_config({"data_path": str(odd), "cache_dir": str(tmp_path / "cache")})
    assert tl.load_corpus(cfg).files == [odd]


def test_an_instruct_model_fine_tunes_on_plain_text(tmp_path, run_args, capsys):
    transformers = pytest.importorskip("transformers", reason="in requirements-dev.txt")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "instruct")
    tok = tl.train_bpe_tokenizer(iter([make_corpus(tmp_path / "t.txt").read_text()]), 300)
    (tmp_path / "instruct" / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "instruct" / "tokenizer_config.json").write_text(json.dumps({"chat_template": tl.CHATML}))
    assert tl.main(run_args("--init_from", str(tmp_path / "instruct"), "--max_steps", "2")) == 0
    out = capsys.readouterr().out
    assert "plain text, which the chat template renders none of" in out
    assert tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")["config"]["chat_template"] == tl.CHATML
    # a template given by hand for plain text is still refused before any work
    assert tl.main(run_args("--chat_template", tl.CHATML, out="mine")) == 2
    assert "--chat_template is for conversations" in capsys.readouterr().err
    assert not (tmp_path / "mine").exists()


def peak_cache(tmp_path, dtype=torch.float32):
    key = f"{tl.cpu_name()}|threads={torch.get_num_threads()}|{dtype}|best-of-trials"
    return tmp_path / "cache" / "peak_flops.json", key


def test_an_mfu_above_100_percent_measures_the_peak_again(run_args, tmp_path, capsys, monkeypatch):
    path, key = peak_cache(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({key: 1e3}))  # measured while the machine was busy: far too low
    assert tl.main(run_args("--peak_flops", "0", "--dtype", "float32")) == 0
    out = capsys.readouterr().out
    assert "MFU was above 100% against the peak of 1e-09 TFLOP/s, measured again" in out
    assert json.loads(path.read_text())[key] > 1e8  # the cached figure replaced
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] <= 1 for r in records if "mfu" in r)
    # a peak that is still impossible after measuring again: MFU unknown, never above 100%
    monkeypatch.setattr(tl, "measure_matmul_flops", lambda dtype: 1e3)
    path.write_text(json.dumps({key: 1e3}))
    assert tl.main(run_args("--peak_flops", "0", "--dtype", "float32", out="again")) == 0
    out = capsys.readouterr().out
    assert "so that peak is wrong; MFU is shown as unknown" in out and "MFU" not in out.split("unknown")[-1]
    records = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] is None for r in records if "mfu" in r)


def test_the_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    """The same documents in another folder (another machine, another user) give the same train
    and val tokens: documents are keyed by their place in the corpus, not by its path."""
    docs = [f"document {i} " + " ".join(random.Random(i).choice(["a", "b", "c"]) for _ in range(20))
            for i in range(150)]
    digests = []
    for where in ("here", "there/deeper"):
        folder = tmp_path / where / "corpus"
        folder.mkdir(parents=True)
        (folder / "one.txt").write_text("<|endoftext|>".join(docs[:80]))
        (folder / "sub").mkdir()
        (folder / "sub" / "two.txt").write_text("<|endoftext|>".join(docs[80:]))
        cfg = tl.build_config({"data_path": str(folder), "cache_dir": str(tmp_path / where / "cache")})
        corpus = tl.load_corpus(cfg)
        tok = tl.build_tokenizer(cfg, corpus)
        splits = tl.prepare_data(cfg, corpus, tok)
        assert 0 < len(splits["val"]) < len(splits["train"])
        digests.append((splits["train"].sha256, splits["val"].sha256))
    assert digests[0] == digests[1]
    moved = tmp_path / "moved.txt"
    shutil.copy(tmp_path / "here" / "corpus" / "one.txt", moved)
    corpus = tl.load_corpus(tl.build_config({"data_path": str(moved)}))
    keys = [key for key, _, _ in tl.document_pieces(corpus)]
    assert keys[0] == "moved:0"


@pytest.mark.parametrize("mode", [["--serve"], ["--chat"], ["--eval_only"], ["--export", "safetensors"]])
def test_num_samples_is_refused_where_no_samples_are_printed(mode, run_args, tmp_path, capsys):
    assert tl.main(run_args("--max_steps", "1")) == 0
    capsys.readouterr()
    assert tl.main([*mode, "--out_dir", str(tmp_path / "out"), "--num_samples", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --num_samples is for --generate_only") and len(err.splitlines()) == 1
