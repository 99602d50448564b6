"""What users see and take away: progress, metrics, MFU, plots, evaluation, benchmark."""

import fcntl
import json
import math
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tl

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_tinyllm.py")
LOG_KEYS = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"}
EVAL_KEYS = {"step", "train_loss", "val_loss", "val_ppl", "val_bpb", "elapsed_s"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_every_field_and_appends_across_resume(run_args, tmp_path):
    tl.train(tl.resolve(run_args()))
    first = metrics(tmp_path / "out")
    logs, evals = [r for r in first if "loss" in r], [r for r in first if "val_loss" in r]
    assert logs and evals and all(LOG_KEYS <= r.keys() for r in logs)
    assert all(EVAL_KEYS <= r.keys() for r in evals)
    r = logs[-1]
    assert r["tokens"] == 6 * 4 * 16 and r["grad_norm"] > 0 and r["elapsed_s"] > 0
    vocab = tl.TextTokenizer.from_str((tmp_path / "out" / "tokenizer.json").read_text()).vocab_size
    fpt = tl.flops_per_token(tl.GPT(tl.build_config(tl.parse_args(run_args())), vocab), 16)
    assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 1e11, rel=1e-6)
    e = evals[-1]
    assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
    tl.train(tl.resolve(run_args("--resume", "--max_steps", "8")))
    assert metrics(tmp_path / "out")[:len(first)] == first and metrics(tmp_path / "out")[-1]["step"] == 8
    tl.train(tl.resolve(run_args("--overwrite", "--max_steps", "2")))
    assert max(r["step"] for r in metrics(tmp_path / "out")) == 2  # a new run, a new log


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = tl.Config(n_layer=2, n_head=4, n_embd=32, block_size=16, mlp="gelu", tie_weights=True)
    model = tl.GPT(cfg, 50)
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 * 2  # qkv, out_proj, fc, out_proj
    assert tl.flops_per_token(model, 16) == 6 * (2 * per_layer + 32 * 50) + 12 * 2 * 16 * 32
    windowed = tl.GPT(tl.Config(**{**tl.asdict(cfg), "sliding_window": 4}), 50)
    assert tl.flops_per_token(windowed, 16) == 6 * (2 * per_layer + 32 * 50) + 12 * 2 * 4 * 32


def test_gpu_peak_table():
    assert tl.gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert tl.gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert tl.gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert tl.gpu_peak_flops("NVIDIA GeForce RTX 4090", torch.float16) == 165e12
    assert tl.gpu_peak_flops("Tesla T4", torch.float16) == 65e12
    assert tl.gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    first = tl.cpu_peak_flops(torch.float32, str(tmp_path))
    assert 1e9 < first < 1e13
    monkeypatch.setattr(tl, "measure_matmul_flops", lambda *a: pytest.fail("measured twice"))
    assert tl.cpu_peak_flops(torch.float32, str(tmp_path)) == first
    assert tl.peak_flops(tl.Config(peak_flops=5e12), torch.device("cpu"), torch.float32) == 5e12


def test_bits_per_byte_logged_and_consistent(run_args, tmp_path):
    tl.train(tl.resolve(run_args()))
    meta = json.loads(next((tmp_path / "cache").glob("tokens-*/meta.json")).read_text())
    val = np.fromfile(next((tmp_path / "cache").glob("tokens-*/val.bin")), dtype=np.uint16)
    tok = tl.TextTokenizer.from_str((tmp_path / "out" / "tokenizer.json").read_text())
    assert meta["val_bytes"] == len(tok.decode(val.tolist()).encode("utf-8")) > meta["val_tokens"]
    e = [r for r in metrics(tmp_path / "out") if "val_bpb" in r][-1]
    assert e["val_bpb"] == pytest.approx(e["val_loss"] / math.log(2) * meta["val_tokens"] / meta["val_bytes"])


def run_on_terminal(argv: list[str]) -> str:
    """Run a command with stdout on a pseudo-terminal, as a user's shell would."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns
    proc = subprocess.Popen(argv, stdout=slave, stderr=slave, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal_plain_lines_otherwise(run_args, tmp_path):
    screen = run_on_terminal([sys.executable, SCRIPT, *run_args("--max_steps", "30", "--log_interval", "10",
                                                                "--eval_interval", "30", out="tty")])
    assert "30/30" in screen and ("step/s" in screen or "s/step" in screen)  # tqdm's bar
    assert "tok/s" in screen and "MFU" in screen and "tokenizing" in screen  # MB/s bar of the corpus
    assert "scanning" in screen and "tokenizer training" in screen and "MB/s" in screen  # every stage
    assert "\nstep     10/30 | loss" not in screen  # no plain log lines under the bar
    assert screen.index("measuring:") < screen.index("| 0/30")  # the startup lines come before the bar
    piped = subprocess.run([sys.executable, SCRIPT, *run_args("--max_steps", "30", "--log_interval", "10",
                                                              "--eval_interval", "30", out="pipe")],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "step     10/30 | loss" in piped.stdout and "\r" not in piped.stdout


def test_loss_plot_written_at_end_and_on_demand(run_args, tmp_path, capsys):
    assert tl.main(run_args()) == 0
    png = tmp_path / "out" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    png.unlink()
    assert tl.main(["--plot", "--out_dir", str(tmp_path / "out")]) == 0 and png.is_file()
    assert tl.main(["--plot", "--out_dir", str(tmp_path / "nothing")]) == 2
    assert "no metrics at" in capsys.readouterr().err


def test_tensorboard_receives_the_metrics(run_args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tl.train(tl.resolve(run_args("--tensorboard")))
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    assert {"loss", "val_loss", "val_bpb", "lr", "mfu"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_no_wandb_run_is_opened_for_a_refused_run(run_args, monkeypatch, tmp_path):
    """Metric sinks open after every check of the run: a refused optimizer leaves no W&B run
    open and no tensorboard folder behind."""
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw)))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(tl.TinyLLMError, match="pip install bitsandbytes"):
        tl.train(tl.resolve(run_args("--wandb", "--tensorboard", "--optimizer", "adamw8bit")))
    assert calls == [] and not (tmp_path / "out" / "tensorboard").exists()


def test_wandb_is_called_only_when_asked(run_args, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
            finish=lambda: calls.append(("finish",))),
        log=lambda data, step: calls.append(("log", step, data)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tl.train(tl.resolve(run_args("--wandb", "--wandb_project", "demo")))
    assert calls[0][0] == "init" and calls[0][1]["project"] == "demo" and calls[-1] == ("finish",)
    assert [c[1] for c in calls if c[0] == "log" and "loss" in c[2]] == [1, 2, 3, 4, 5, 6]
    calls.clear()
    tl.train(tl.resolve(run_args(out="plain")))
    assert calls == []
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(tl.TinyLLMError, match="pip install wandb"):
        tl.train(tl.resolve(run_args("--wandb", out="missing")))


def test_eval_only_on_val_split_and_on_a_file(run_args, tmp_path, corpus, capsys):
    tl.train(tl.resolve(run_args()))
    capsys.readouterr()
    on_val = tl.evaluate_checkpoint(tl.resolve(["--eval_only", "--out_dir", str(tmp_path / "out")]))
    assert 0 < on_val["accuracy"] < 1 and on_val["perplexity"] == pytest.approx(math.exp(on_val["loss"]))
    text = "the cat sat on a mat and ran far away\n" * 40
    (tmp_path / "held_out.txt").write_text(text)
    on_file = tl.evaluate_checkpoint(tl.resolve(["--eval_only", "--out_dir", str(tmp_path / "out"),
                                                    "--eval_data", str(tmp_path / "held_out.txt")]))
    assert on_file["bpb"] == pytest.approx(on_file["loss"] / math.log(2))  # ASCII: 1 char = 1 byte
    assert on_file["tokens"] == (len(text) - 1) // 16 * 16
    out = capsys.readouterr().out
    assert "bits per byte" in out and "next-token accuracy" in out and "held_out.txt" in out
    (tmp_path / "alien.txt").write_text("ΩΩΩ " * 100)
    assert tl.main(["--eval_only", "--out_dir", str(tmp_path / "out"), "--eval_data",
                    str(tmp_path / "alien.txt")]) == 2


def test_benchmark_prints_a_table_and_writes_nothing(run_args, tmp_path, capsys):
    result = tl.benchmark(tl.resolve(run_args("--benchmark", "--max_new_tokens", "20")),
                          warmup=1, repeats=2)
    assert not (tmp_path / "out").exists()
    for key in ("train_tokens_per_s", "mfu", "peak_memory_mb", "decode_tokens_per_s_none",
                "decode_tokens_per_s_int8", "decode_tokens_per_s_no_cache", "prefill_tokens_per_s",
                "first_token_ms"):
        assert result[key] > 0, key
    assert result["decode_compiled"] is False  # run_args has --no-compile_decode
    out = capsys.readouterr().out
    assert "training tokens/s" in out and "KV cache, int8 weights" in out and "MFU" in out
    assert "prefill, " in out and "first token after" in out
