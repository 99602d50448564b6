import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tl

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_tinyllm.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tl.build_config({"n_layer": 2, "n_embd": 32, "block_size": 16, "learning_rate": 3e-3})
    model = tl.GPT(cfg, 40)
    opt = tl.make_optimizers(model, cfg, torch.device("cpu"))[0]
    x = torch.randint(40, (4, 17))
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1


def test_weight_decay_only_on_2d_weights():
    model = tl.GPT(tl.Config(n_layer=1, n_embd=32, bias=True, norm="layernorm"), 20)
    decay, no_decay = tl.make_optimizers(model, tl.Config(), torch.device("cpu"))[0].param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    cfg = tl.Config(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert tl.lr_at(0, cfg) == 0.1 and tl.lr_at(9, cfg) == 1.0
    assert abs(tl.lr_at(60, cfg) - 0.55) < 1e-9 and abs(tl.lr_at(110, cfg) - 0.1) < 1e-9


def test_train_writes_run_directory(run_args, tmp_path):
    history = tl.train(tl.resolve(run_args()))
    out = tmp_path / "out"
    for name in ("ckpt.pt", "ckpt_best.pt", "tokenizer.json", "effective_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and json.loads(json.dumps(ckpt["config"])) == ckpt["config"]
    assert ckpt["config"] == json.loads((out / "effective_config.json").read_text())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    evals = [r for r in history if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and ckpt["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(history)


def test_resume_gives_same_losses_as_uninterrupted(run_args):
    """Run 8 steps straight; run 4, then --resume to 8: the last 4 losses are identical.
    Dropout is on so the global RNG matters; a constant LR keeps both schedules equal."""
    common = ("--dropout", "0.1", "--min_lr", "1e-3", "--learning_rate", "1e-3", "--warmup_steps", "0",
              "--eval_interval", "4")
    straight = tl.train(tl.resolve(run_args(*common, "--max_steps", "8", out="a")))
    tl.train(tl.resolve(run_args(*common, "--max_steps", "4", out="b")))
    resumed = tl.train(tl.resolve(run_args(*common, "--max_steps", "8", "--resume", out="b")))
    tail = [r["loss"] for r in straight if "loss" in r and r["step"] > 4]
    assert len(tail) == 4 and tail == [r["loss"] for r in resumed if "loss" in r]


def test_resume_refuses_other_architecture(run_args, capsys):
    assert tl.main(run_args("--resume")) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    tl.train(tl.resolve(run_args()))
    assert tl.main(run_args("--resume", "--n_layer", "3")) == 2
    assert "--n_layer 3 does not match the checkpoint" in capsys.readouterr().err
    assert tl.main(run_args("--resume", "--tokenizer", "bpe")) == 2


def test_generate_only_without_checkpoint(tmp_path, capsys):
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "none")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_prompt_outside_char_vocab_refused(run_args, tmp_path, capsys):
    tl.train(tl.resolve(run_args()))
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "out"), "--prompt", "cat ∑"]) == 2
    assert "'∑'" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_train_then_generate(run_args, tmp_path):
    """End to end through the real command line, as a user runs it."""
    train = subprocess.run([sys.executable, SCRIPT, *run_args("--tokenizer", "bpe", "--bpe_vocab_size",
                                                              "300", "--arch", "gpt2")],
                           capture_output=True, text=True, timeout=120, env=ENV)
    assert train.returncode == 0, train.stderr
    assert "parameters" in train.stdout and "eval step 6" in train.stdout
    gen = [sys.executable, SCRIPT, "--generate_only", "--out_dir", str(tmp_path / "out"),
           "--prompt", "the cat", "--max_new_tokens", "20", "--seed", "3", "--num_samples", "2"]
    first = subprocess.run(gen, capture_output=True, text=True, timeout=60, env=ENV)
    again = subprocess.run(gen, capture_output=True, text=True, timeout=60, env=ENV)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("the cat") == 2 and first.stdout == again.stdout
    assert "ckpt_best.pt" in first.stderr


def test_checkpoint_device_does_not_carry_over(run_args, tmp_path):
    """A model trained on a GPU must sample on a CPU-only machine without extra flags."""
    tl.train(tl.resolve(run_args()))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["config"]["device"] = "cuda"  # as if trained on a GPU
    torch.save(ckpt, tmp_path / "gpu_ckpt.pt")
    resolved = tl.resolve(["--generate_only", "--ckpt", str(tmp_path / "gpu_ckpt.pt")])
    use = tl.load_for_use(resolved)
    assert use.cfg.device == "auto" and use.device.type == tl.pick_device("auto").type
    assert resolved.ckpt is None  # the loaded copy is let go once the model holds the weights


def test_resume_accepts_checkpoints_without_newer_counters(run_args, tmp_path):
    tl.train(tl.resolve(run_args()))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    for key in ("nonfinite_skips", "overflow_skips", "elapsed_s"):
        del ckpt[key]
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    history = tl.train(tl.resolve(run_args("--resume", "--max_steps", "7")))
    assert [r["step"] for r in history if "loss" in r] == [7]
