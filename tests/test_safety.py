"""Never lose a run, never crash on bad input, never run a stranger's code."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_corpus, tl

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_tinyllm.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One finished tiny char-level run that the bad inputs below must leave untouched."""
    root = tmp_path_factory.mktemp("run")
    corpus = make_corpus(root / "corpus.txt")
    out = root / "out"
    assert tl.main(["--data_path", str(corpus), "--out_dir", str(out), "--cache_dir",
                    str(root / "cache"), *TINY]) == 0
    return {"root": root, "corpus": corpus, "out": out}


def bad_inputs(t: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    root, out, corpus = t["root"], str(t["out"]), str(t["corpus"])
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (root / "nul.txt").write_bytes(b"text\x00with\x00nul" * 50)
    (root / "small.txt").write_text("tiny corpus\n")
    (root / "new_chars.txt").write_text("QQQ ZZZ XXX qqq\n" * 200)
    make_corpus(root / "other_lines.txt", n_lines=300)  # the same characters, other text
    (root / "bad.json").write_text('{"n_layer": 2,}')
    (root / "unknown.json").write_text('{"n_layers": 2}')
    (root / "typed.json").write_text('{"n_layer": "two"}')
    (root / "a_file").write_text("not a directory")
    (root / "no_text").mkdir(exist_ok=True)
    (root / "no_text" / "image.png").write_bytes(b"\x89PNG")
    fresh = ["--out_dir", out, "--overwrite", "--cache_dir", str(root / "cache"), *TINY]
    gen = ["--generate_only", "--out_dir", out]
    return [
        ("missing data file", ["--data_path", str(root / "nope.txt"), *fresh], "does not exist"),
        ("directory without text files", ["--data_path", str(root / "no_text"), *fresh],
         "is a directory with no .txt, .md, .jsonl or .parquet files"),
        ("glob matching nothing", ["--data_path", str(root / "*.nothing"), *fresh], "matches no files"),
        ("empty data file", ["--data_path", str(root / "empty.txt"), *fresh], "is empty"),
        ("not UTF-8", ["--data_path", str(root / "latin1.txt"), *fresh], "is not UTF-8 text"),
        ("binary with NUL bytes", ["--data_path", str(root / "nul.txt"), *fresh], "looks binary"),
        ("corpus too small", ["--data_path", str(root / "small.txt"), *fresh], "tokens but needs at least"),
        ("invalid JSON", ["--config", str(root / "bad.json"), *fresh], "invalid JSON at line 1"),
        ("unknown JSON key", ["--config", str(root / "unknown.json"), *fresh], "did you mean 'n_layer'"),
        ("ill-typed JSON", ["--config", str(root / "typed.json"), *fresh], "must be int"),
        ("bad flag value", [*fresh, "--n_layer", "two"], "invalid int value: 'two'"),
        ("learning rate <= 0", [*fresh, "--learning_rate", "0"], "--learning_rate must be positive"),
        ("batch size 0", [*fresh, "--batch_size", "0"], "--batch_size must be at least 1"),
        ("dropout 1", [*fresh, "--dropout", "1"], "--dropout must be in [0, 1)"),
        ("top_p > 1", [*gen, "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        ("temperature < 0", [*gen, "--temperature", "-1"], "--temperature must be 0"),
        ("max_new_tokens < 0", [*gen, "--max_new_tokens", "-1"], "--max_new_tokens must be 0 or more"),
        ("generate without checkpoint", ["--generate_only", "--out_dir", str(root / "none")],
         "no checkpoint at"),
        ("resume without checkpoint", ["--resume", "--out_dir", str(root / "none"), "--data_path", corpus],
         "--resume: no checkpoint"),
        ("resume, other architecture", ["--resume", "--out_dir", out, "--data_path", corpus,
                                        "--n_embd", "64"], "--n_embd 64 does not match the checkpoint"),
        ("resume, other tokenizer", ["--resume", "--out_dir", out, "--data_path", corpus,
                                     "--tokenizer", "bpe"], "--tokenizer 'bpe' does not match"),
        ("resume, corpus changed", ["--resume", "--out_dir", out, "--data_path",
                                    str(root / "other_lines.txt")],
         "--resume: the training data changed since"),
        ("resume, corpus outside the vocabulary", ["--resume", "--out_dir", out, "--data_path",
                                                   str(root / "new_chars.txt"), "--allow_data_change"],
         "outside the char-level"),
        ("prompt outside the vocabulary", [*gen, "--prompt", "cat ∑ Ω"], "'Ω' '∑'"),
        ("out_dir is a file", ["--out_dir", str(root / "a_file"), "--data_path", corpus],
         "is an existing file"),
        ("new run over an existing one", ["--out_dir", out, "--data_path", corpus, *TINY],
         "already holds a run"),
    ]


def test_bad_inputs_one_line_exit_2_out_dir_untouched(trained, capsys):
    before = snapshot(trained["out"])
    for name, argv, needle in bad_inputs(trained):
        assert tl.main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, (name, err)
        assert needle in err, (name, err)
        assert snapshot(trained["out"]) == before, name


def test_unreadable_data_file(trained, capsys, monkeypatch):
    real_open = open

    def denied(path, *args, **kwargs):  # what a file without read permission gives (tests run as root)
        if Path(path) == trained["corpus"]:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(tl, "open", denied, raising=False)
    assert tl.main(["--data_path", str(trained["corpus"]), "--out_dir", str(trained["root"] / "x")]) == 2
    assert "cannot be read (Permission denied); check its permissions" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint(trained, capsys, damage):
    out = trained["root"] / f"corrupt_{damage}"
    shutil.copytree(trained["out"], out, dirs_exist_ok=True)
    ckpt = out / "ckpt.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    (out / "ckpt_best.pt").unlink()
    before = snapshot(out)
    for argv in (["--generate_only", "--out_dir", str(out)],
                 ["--resume", "--out_dir", str(out), "--data_path", str(trained["corpus"])]):
        assert tl.main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot be loaded as a tinyllm checkpoint" in err and len(err.strip().splitlines()) == 1
    assert snapshot(out) == before


@pytest.mark.slow
def test_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--data_path", str(tmp_path / "missing.txt"),
                           "--out_dir", str(tmp_path / "o")], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --data_path {tmp_path / 'missing.txt'} does not exist; point --data_path at a UTF-8 "
        f"text file, a directory, a glob or a URL"]


class Evil:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_runs_nothing(tmp_path, capsys, corpus):
    marker = tmp_path / "pwned"
    out = tmp_path / "evil_run"
    out.mkdir()
    torch.save({"format": 1, "model": Evil(marker)}, out / "ckpt.pt")
    for argv in (["--generate_only", "--out_dir", str(out)],
                 ["--generate_only", "--ckpt", str(out / "ckpt.pt")],
                 ["--resume", "--out_dir", str(out), "--data_path", str(corpus)]):
        assert tl.main(argv) == 2
        assert "was refused" in capsys.readouterr().err  # issue 12: our words, never torch's advice
    assert not marker.exists()
    import pickle
    pickle.loads(pickle.dumps(Evil(marker)))  # proves the payload is real: plain pickle runs it
    assert marker.exists()


def start_training(tmp_path: Path, corpus: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, SCRIPT, "--data_path", str(corpus), "--out_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *TINY, "--max_steps", "100000",
            "--eval_interval", "1000000", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_steps(proc: subprocess.Popen, n: int) -> None:
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("step ")
        if seen >= n:
            return
    raise AssertionError(f"training ended early: {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resume_continues(tmp_path, corpus, sig):
    proc = start_training(tmp_path, corpus)
    wait_for_steps(proc, 5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and f"interrupted by {sig.name} at step" in stdout
    assert f"--out_dir {tmp_path / 'out'} --resume" in stdout
    step = int(stdout.split(" at step ")[1].split(":")[0])
    ckpt = tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["step"] == step >= 5
    history = tl.train(tl.resolve(["--out_dir", str(tmp_path / "out"), "--resume",
                                      "--max_steps", str(step + 3)]))
    assert [r["step"] for r in history if "loss" in r] == [step + 1, step + 2, step + 3]


@pytest.mark.slow
def test_kill_9_leaves_a_loadable_checkpoint(tmp_path, corpus):
    """SIGKILL at three different moments of a run that checkpoints every step: each time the
    last complete ckpt.pt loads, and --resume carries on from it."""
    steps = []
    for i, delay in enumerate((0.0, 0.05, 0.13)):
        proc = start_training(tmp_path, corpus, "--eval_interval", "1", "--eval_iters", "1",
                              *(["--resume"] if i else []))
        wait_for_steps(proc, 2)
        time.sleep(delay)
        proc.kill()
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        steps.append(tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"])
    assert steps[0] >= 1 and steps[0] < steps[1] < steps[2]  # every resume went further
    history = tl.train(tl.resolve(["--out_dir", str(tmp_path / "out"), "--resume",
                                      "--max_steps", str(steps[-1] + 1)]))
    assert history[0]["step"] == steps[-1] + 1
    assert not list((tmp_path / "out").glob(".*.tmp*"))  # a half-written temp file is cleaned up


def test_stale_temp_files_are_removed(run_args, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".ckpt.pt.tmp999").write_bytes(b"half a checkpoint")
    tl.train(tl.resolve(run_args("--max_steps", "1")))
    assert not (tmp_path / "out" / ".ckpt.pt.tmp999").exists()


def poison_steps(monkeypatch, bad_calls: set[int]) -> None:
    """Make the training loss NaN on the given forward calls (counted in training mode)."""
    real, calls = tl.GPT.forward, [0]

    def forward(self, idx, targets=None, **kw):
        logits, loss = real(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] in bad_calls or (-1 in bad_calls and calls[0] > 2):
                loss = loss * float("nan")
        return logits, loss
    monkeypatch.setattr(tl.GPT, "forward", forward)


def test_nonfinite_steps_are_skipped_and_counted(run_args, monkeypatch, tmp_path, capsys):
    poison_steps(monkeypatch, {3, 4})
    history = tl.train(tl.resolve(run_args("--dtype", "float32")))
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "update skipped (2 in a row, 2 in all)" in capsys.readouterr().out
    ckpt = tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["nonfinite_skips"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_too_many_nonfinite_steps_stop_the_run(run_args, monkeypatch, tmp_path, capsys):
    poison_steps(monkeypatch, {-1})  # every step after the second
    status = tl.main(run_args("--dtype", "float32", "--eval_interval", "2", "--max_nonfinite", "3",
                              "--max_steps", "50"))
    err = capsys.readouterr().err
    assert status == 1 and "3 optimizer steps in a row had a non-finite loss" in err
    # skipped steps leave the weights alone, so the step-4 checkpoint is still a good one
    assert "last good checkpoint:" in err and "(step 4)" in err
    ckpt = tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["step"] == 4 and ckpt["nonfinite_skips"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4416")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   OSError(errno.EACCES, os.strerror(errno.EACCES)), TORCH_FULL_DISK],
                         ids=["ENOSPC", "EACCES", "torch-writer-on-a-full-disk"])
def test_failed_checkpoint_write_keeps_the_previous(run_args, monkeypatch, tmp_path, capsys, error):
    """A failed write is a warning and training goes on, whether the OS says why or torch's zip
    writer only says 'unexpected pos' (then the free space tells)."""
    real_save, calls = torch.save, [0]

    def flaky_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] > 2:  # the first eval (ckpt + best) succeeds, everything after fails
            with open(f, "wb") as half:
                half.write(b"partial")
            raise error
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", flaky_save)
    monkeypatch.setattr(tl.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1, used=1, free=0))
    assert tl.main(run_args()) == 0
    reason = error.strerror if isinstance(error, OSError) else os.strerror(errno.ENOSPC)
    err = capsys.readouterr().err
    assert f"could not write a checkpoint to {tmp_path / 'out'} ({reason}); the previous " \
           f"checkpoint is kept (step 3)" in err and "Traceback" not in err
    assert tl.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 3
    assert not list((tmp_path / "out").glob(".*.tmp*"))


def test_two_runs_on_one_out_dir(run_args, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    holder = tl.lock_out_dir(tmp_path / "out")  # another run holds the directory
    try:
        assert tl.main(run_args()) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {os.getpid()})" in err
    finally:
        holder.close()
    assert tl.main(run_args()) == 0  # free again once the other run ends


@pytest.mark.slow
def test_second_process_is_refused_while_first_trains(tmp_path, corpus):
    proc = start_training(tmp_path, corpus)
    try:
        wait_for_steps(proc, 2)
        second = subprocess.run([sys.executable, SCRIPT, "--out_dir", str(tmp_path / "out"), "--resume"],
                                capture_output=True, text=True, env=ENV, timeout=60)
        third = subprocess.run([sys.executable, SCRIPT, "--data_path", str(corpus), "--out_dir",
                                str(tmp_path / "out"), "--overwrite", *TINY],
                               capture_output=True, text=True, env=ENV, timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert second.returncode == 2 and "--resume: no checkpoint" in second.stderr  # none written yet
    assert third.returncode == 2 and f"in use by another run (pid {proc.pid})" in third.stderr
