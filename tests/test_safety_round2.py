"""Never lose a run, round two: the cases a hostile probe broke, each as it must hold now."""

import errno
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import th, tl


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def trained(run_args, tmp_path):
    assert tl.main(run_args("--block_size", "64")) == 0
    return tmp_path / "out"


# ---- 1 and 9. a full disk (while checkpointing: see test_safety.py's failed-write test) -------

def test_a_full_disk_elsewhere_names_the_file(run_args, monkeypatch, tmp_path, capsys):
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", no_space)
    assert tl.main(run_args()) == 2
    err = one_line_error(capsys)
    assert "No space left on device (" in err and "tokenizer-" in err  # the cached tokenizer's path


# ---- 2. non-finite settings ----------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("learning_rate", "inf"), ("learning_rate", "1e400"), ("learning_rate", "nan"),
    ("weight_decay", "nan"), ("norm_eps", "nan"), ("time_budget_s", "nan"), ("grad_clip", "inf"),
])
def test_non_finite_settings_are_refused_naming_the_setting(run_args, tmp_path, capsys, flag, value):
    assert tl.main(run_args(f"--{flag}", value)) == 2
    assert f"--{flag} must be a finite number" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_json_infinity_is_refused(run_args, tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"learning_rate": Infinity}')
    assert tl.main(run_args("--config", str(tmp_path / "c.json"))) == 2
    assert "--learning_rate must be a finite number, got inf" in one_line_error(capsys)


@pytest.mark.parametrize("flag", ["temperature", "repetition_penalty", "top_p"])
def test_non_finite_sampling_settings_are_refused(trained, capsys, flag):
    capsys.readouterr()
    assert tl.main(["--generate_only", "--out_dir", str(trained), f"--{flag}", "nan"]) == 2
    assert f"--{flag} must be a finite number" in one_line_error(capsys)


# ---- 6. crafted checkpoints ----------------------------------------------------------------

class RunsCode:
    def __reduce__(self):
        return (print, ("this ran code",))


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_a_checkpoint_holding_code_is_refused_in_our_words(tmp_path, capsys, kind):
    path = tmp_path / "crafted.pt"
    if kind == "torch.save":
        torch.save({"format": 1, "x": RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"format": 1, "x": RunsCode()}, protocol=4))
    assert tl.main(["--generate_only", "--ckpt", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "this ran code" not in out + err
    assert err.startswith(f"error: {path} was refused") and len(err.strip().splitlines()) == 1
    assert "could run code" in err and "weights_only" not in err and "Warning" not in err


# ---- 9. messages that name the actual file, offset and forms ---------------------------------

def test_nul_byte_is_reported_at_its_offset(run_args, tmp_path, capsys):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"a" * 100_000 + b"\x00" + b"b" * 100)
    assert tl.main(run_args("--data_path", str(path))) == 2
    assert "contains a NUL byte at offset 100000" in one_line_error(capsys)


def test_missing_eval_data_names_only_forms_that_work(trained, tmp_path, capsys):
    capsys.readouterr()
    assert tl.main(["--eval_only", "--out_dir", str(trained), "--eval_data", str(tmp_path / "nope.txt")]) == 2
    err = one_line_error(capsys)
    assert "point --eval_data at a UTF-8 text file" in err and "glob" not in err and "URL" not in err


# ---- 10. a refused run leaves nothing behind -------------------------------------------------

def test_a_refused_corpus_creates_no_out_dir(run_args, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\n".encode("latin-1") * 50)
    assert tl.main(run_args("--data_path", str(path))) == 2
    assert "is not UTF-8 text" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# ---- 12. what the KV cache guarantees ------------------------------------------------------

def test_kv_cache_gives_the_same_greedy_float32_tokens_within_block_size(trained, capsys):
    """The guarantee the help states: --temperature 0 in float32, prompt plus output within
    block_size (64 here: a 27-character prompt and 36 new tokens)."""
    capsys.readouterr()
    args = ["--generate_only", "--out_dir", str(trained), "--temperature", "0", "--dtype", "float32",
            "--prompt", "the cat sat on a mat and ra", "--max_new_tokens", "36"]
    outs = []
    for cache in ("--kv_cache", "--no-kv_cache"):
        assert tl.main([*args, cache]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > 40



# ---- 3. --resume after the corpus changed ----------------------------------------------------

def test_resume_on_changed_data_is_refused_unless_allowed(run_args, tmp_path, corpus, capsys):
    assert tl.main(run_args("--max_steps", "4", "--eval_interval", "2")) == 0
    os.utime(corpus)  # touched, or copied elsewhere: the same tokens, so the same data
    assert tl.main(run_args("--resume", "--max_steps", "4")) == 0
    out = tmp_path / "out"
    before, old_best = (out / "ckpt.pt").read_bytes(), tl.load_checkpoint(out / "ckpt.pt")["best_val_loss"]
    rng = random.Random(0)
    letters = sorted(set(corpus.read_text()) - {"\n"})
    with open(corpus, "a", encoding="utf-8") as f:  # other text: the tail split (val) is now this
        f.write("".join("".join(rng.choice(letters) for _ in range(60)) + "\n" for _ in range(300)))
    capsys.readouterr()
    assert tl.main(run_args("--resume", "--max_steps", "6")) == 2
    err = one_line_error(capsys)
    assert "--resume: the training data changed since" in err and "--allow_data_change" in err
    assert (out / "ckpt.pt").read_bytes() == before  # nothing touched
    history = tl.train(tl.resolve(run_args("--resume", "--max_steps", "6", "--allow_data_change")))
    assert "the best val loss starts over" in capsys.readouterr().out
    new_val = [r["val_loss"] for r in history if "val_loss" in r][-1]
    assert new_val > old_best  # harder text; without the reset the old best would stand
    assert tl.load_checkpoint(out / "ckpt.pt")["best_val_loss"] == new_val
    assert tl.load_checkpoint(out / "ckpt_best.pt")["step"] == 6


# ---- 5. samples start from a token the model saw text follow ----------------------------------

def test_samples_start_from_a_token_seen_in_training(run_args, tmp_path, monkeypatch, capsys):
    assert tl.main(run_args()) == 0  # one document: end-of-text never occurs in training
    ckpt = tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    tok = tl.TextTokenizer.from_str(ckpt["tokenizer"])
    assert ckpt["start_ids"] == [tok.vocab["\n"]] != [tok.eot_id]
    starts, real = [], tl.generate
    monkeypatch.setattr(tl, "generate", lambda model, idx, *a, **k: starts.append(idx.tolist())
                        or real(model, idx, *a, **k))
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "out"), "--num_samples", "2"]) == 0
    assert starts == [[ckpt["start_ids"]] * 2]  # both samples in one batch
    assert tl.main(["--export", "safetensors", "--out_dir", str(tmp_path / "out")]) == 0
    exported = tl.load_checkpoint(tmp_path / "out" / "export-safetensors" / "model.safetensors")
    assert exported["start_ids"] == ckpt["start_ids"]
    docs = tmp_path / "docs.txt"  # many documents: end-of-text sits between them
    docs.write_text("<|endoftext|>".join(f"story {i}: the cat sat on the mat.\n" for i in range(300)))
    assert tl.main(run_args("--data_path", str(docs), out="docs")) == 0
    ckpt = tl.load_checkpoint(tmp_path / "docs" / "ckpt.pt")
    assert ckpt["start_ids"] == [tl.TextTokenizer.from_str(ckpt["tokenizer"]).eot_id]


# ---- 11. a byte-order mark and \r\n line ends --------------------------------------------------

def test_bom_and_crlf_are_normalized_unless_raw_text(tmp_path, monkeypatch):
    text = "hello world, the cat sat on the mat.\n" * 400
    crlf, lf = tmp_path / "crlf.txt", tmp_path / "lf.txt"
    crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    lf.write_text(text)
    monkeypatch.setattr(tl, "READ_SIZE", 1001)  # some \r\n pairs straddle two blocks (at byte 6006)

    def prepared(path, **settings):
        cfg = tl.build_config({"data_path": str(path), "cache_dir": str(tmp_path / "cache"),
                               "block_size": 8, **settings})
        corpus = tl.load_corpus(cfg)
        tok = tl.build_tokenizer(cfg, corpus)
        return tok, tl.prepare_data(cfg, corpus, tok)["train"].tokens()
    (tok_crlf, crlf_tokens), (tok_lf, lf_tokens) = prepared(crlf), prepared(lf)
    assert "\r" not in tok_crlf.vocab and "\ufeff" not in tok_crlf.vocab
    assert tok_crlf.to_str() == tok_lf.to_str() and np.array_equal(crlf_tokens, lf_tokens)
    tok_raw, _ = prepared(crlf, raw_text=True)
    assert "\r" in tok_raw.vocab and "\ufeff" in tok_raw.vocab


# ---- 4 and 7. exports: a full disk, someone else's directory, file modes -----------------------

def test_export_on_a_full_disk_leaves_no_half_export(trained, monkeypatch, capsys):
    assert tl.main(["--export", "safetensors", "--out_dir", str(trained)]) == 0
    previous = (trained / "export-safetensors" / "model.safetensors").read_bytes()
    import safetensors.torch

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                          "(os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    capsys.readouterr()
    for export_dir in ([], ["--export_dir", str(trained.parent / "fresh")]):
        assert tl.main(["--export", "safetensors", "--out_dir", str(trained), *export_dir]) == 2
        err = one_line_error(capsys)
        assert "could not write" in err and "model.safetensors (" in err and "No space left on device" in err
        assert "nothing was changed" in err
    assert (trained / "export-safetensors" / "model.safetensors").read_bytes() == previous  # kept
    assert not (trained.parent / "fresh").exists()
    assert not list(trained.parent.rglob(f"{th.STAGING}*"))  # no staging folder left


def test_export_never_overwrites_someone_elses_directory(trained, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    capsys.readouterr()
    assert tl.main(["--export", "hf", "--out_dir", str(trained), "--export_dir", str(mine)]) == 2
    assert "holds files that are not a tinyllm export (config.json)" in one_line_error(capsys)
    assert (mine / "config.json").read_text() == '{"mine": true}' and len(list(mine.iterdir())) == 1
    ours = tmp_path / "ours"
    for _ in range(2):  # a previous export of ours is replaced
        assert tl.main(["--export", "hf", "--out_dir", str(trained), "--export_dir", str(ours)]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in ours.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] == 0o666 & ~tl.current_umask(), modes


# ---- 8. Ctrl-C: prompt, and the right words for each mode ---------------------------------------

def test_ctrl_c_during_generation_ends_the_line_and_says_so(trained, monkeypatch, capsys):
    def interrupted(model, idx, settings, generator=None, on_token=None, stop_ids=None):
        on_token(idx[:, -1:])  # one token reaches the screen, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(tl, "generate", interrupted)
    capsys.readouterr()
    assert tl.main(["--generate_only", "--out_dir", str(trained), "--prompt", "the"]) == 130
    out, err = capsys.readouterr()
    assert out.endswith("\n") and err.strip().splitlines()[-1] == "interrupted; generation stopped"


def test_interrupted_encoding_deletes_its_files_without_encoding_the_rest(tmp_path, monkeypatch):
    calls = []

    def encode_batch(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
    monkeypatch.setattr(tl.TextTokenizer, "encode_batch", encode_batch)
    path = tmp_path / "c.txt"
    path.write_text("the cat sat on the mat and ran far away\n" * 60_000)  # about 2.4 MB: several batches
    cfg = tl.build_config({"data_path": str(path), "cache_dir": str(tmp_path / "cache"), "block_size": 8})
    corpus = tl.load_corpus(cfg)
    tok = tl.build_tokenizer(cfg, corpus)
    with pytest.raises(KeyboardInterrupt):
        tl.prepare_data(cfg, corpus, tok)
    assert len(calls) == 2 and not list((tmp_path / "cache").rglob("*.bin*"))  # no third batch


@pytest.mark.slow
def test_ctrl_c_during_bpe_training_exits_at_once_and_cleanly(tmp_path, corpus):
    """BPE training runs in native code in a worker thread: Ctrl-C while it pulls text (here
    slowly, so the moment is certain) exits within a second with status 130 and our message,
    not with an abort from the library's threads at interpreter exit."""
    import signal
    import subprocess
    import sys
    import time
    folder = str(Path(tl.__file__).parent)
    code = f"""
import sys, time
sys.path.insert(0, {folder!r})
import train_tinyllm as tl
real = tl.training_texts
def slow(corpus):
    print("feeding", flush=True)
    for piece in real(corpus):
        for i in range(0, len(piece), 200):
            time.sleep(0.05)
            yield piece[i:i + 200]
tl.training_texts = slow
sys.exit(tl.main(["--data_path", {str(corpus)!r}, "--tokenizer", "bpe", "--bpe_vocab_size", "300",
                  "--cache_dir", {str(tmp_path / "cache")!r}, "--out_dir", {str(tmp_path / "out")!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while "feeding" not in proc.stdout.readline():
        pass
    time.sleep(0.3)
    start = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "FATAL" not in err and "Traceback" not in err, err[-500:]
    assert err.strip().splitlines()[-1] == "interrupted before training started; nothing was lost"
    assert time.time() - start < 2.0 and not (tmp_path / "out").exists()


def test_in_background_returns_the_value_and_raises_the_error():
    assert tl.in_background(lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        tl.in_background(lambda: 1 / 0)


@pytest.mark.parametrize("content, needle", [(b"\xef\xbb\xbf", "is empty"),
                                             (b"a", "tokens but needs at least")])
def test_a_corpus_with_almost_nothing_is_one_line(run_args, tmp_path, capsys, content, needle):
    path = tmp_path / "nearly_empty.txt"
    path.write_bytes(content)
    assert tl.main(run_args("--data_path", str(path))) == 2
    assert needle in one_line_error(capsys)
