"""--fsdp: PyTorch FSDP2 under torchrun (gloo on CPU), sharded checkpoints, resume on another world size."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_corpus, th, tl

SCRIPT = str(Path(tl.__file__).resolve())
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(ranks: int, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={ranks}", SCRIPT, *argv],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.mark.slow
def test_fsdp_is_ddp_sharded_and_resumes_on_any_world_size(tmp_path):
    """20 float32 steps on 2 ranks: --fsdp gives --ddp's losses and weights within 1e-5; its
    checkpoint is a folder of shards that one process resumes from exactly (the global batch kept by
    twice the accumulation), and that every single-process mode reads; a DDP checkpoint resumes
    under --fsdp on 4 ranks."""
    corpus = make_corpus(tmp_path / "corpus.txt")
    common = ["--data_path", str(corpus), "--cache_dir", str(tmp_path / "cache"), *TINY, "--dtype", "float32",
              "--max_steps", "20", "--eval_interval", "10"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(2, *common, "--out_dir", str(ddp))
    done = torchrun(2, *common, "--out_dir", str(fsdp), "--fsdp", "--stop_at_step", "10")
    assert "(FSDP: weights, gradients and optimizer state sharded)" in done.stdout
    shards = {p.name for p in (fsdp / "ckpt.pt").iterdir()}
    assert (fsdp / "ckpt.pt").is_symlink() and {"__0_0.distcp", "__1_0.distcp", "state.pt"} <= shards
    assert losses(fsdp) == pytest.approx(losses(ddp)[:10], abs=1e-5)
    # a sharded checkpoint is read whole by one process, in every mode
    assert (fsdp / "ckpt_best.pt").is_dir()
    assert tl.main(["--generate_only", "--out_dir", str(fsdp), "--max_new_tokens", "4",
                    "--no-compile_decode"]) == 0
    assert tl.main(["--eval_only", "--out_dir", str(fsdp)]) == 0
    assert tl.main(["--export", "safetensors", "--out_dir", str(fsdp)]) == 0
    assert th.load_source((fsdp / "ckpt_best.pt").resolve()).family == "tinyllm"  # --init_from takes it
    damaged = tmp_path / "damaged"
    shutil.copytree((fsdp / "ckpt_best.pt").resolve(), damaged)
    (damaged / "__1_0.distcp").unlink()
    with pytest.raises(tl.TinyLLMError, match="cannot be loaded as a sharded tinyllm checkpoint"):
        tl.load_checkpoint(damaged)
    assert tl.main(["--out_dir", str(fsdp), "--resume"]) == 0  # one process, no torchrun
    assert losses(fsdp) == pytest.approx(losses(ddp), abs=1e-5)
    whole, resumed = tl.load_checkpoint(ddp / "ckpt.pt"), tl.load_checkpoint(fsdp / "ckpt.pt")
    assert whole["model"].keys() == resumed["model"].keys()
    for name, w in whole["model"].items():
        assert torch.allclose(w, resumed["model"][name], atol=1e-5), name
    assert not [p for p in (fsdp / "shards").iterdir() if p.name.startswith("ckpt-")]  # the old shards went
    # a DDP checkpoint resumed under --fsdp on 4 ranks, the global batch of 8 kept
    done = torchrun(4, "--out_dir", str(ddp), "--resume", "--fsdp", "--max_steps", "22", "--batch_size", "1")
    assert "--grad_accum_steps 1 -> 2 keeps the global batch of 8 sequences" in done.stdout
    assert torch.load(ddp / "ckpt.pt" / "state.pt", weights_only=True)["step"] == 22
    # LoRA: the frozen base sharded too; the checkpoint holds the adapters, read on their base
    lora = tmp_path / "lora"
    torchrun(2, *common, "--out_dir", str(lora), "--fsdp", "--init_from", str(tmp_path / "fsdp" / "ckpt.pt"),
             "--lora_rank", "2", "--max_steps", "3", "--eval_interval", "3")
    adapters = tl.load_checkpoint(lora / "ckpt.pt")["model"]
    assert adapters and all(".lora_" in k for k in adapters)
    assert tl.main(["--generate_only", "--out_dir", str(lora), "--max_new_tokens", "4",
                    "--no-compile_decode"]) == 0


def test_what_fsdp_cannot_do_is_refused_by_name(run_args, capsys):
    for extra, said in ((("--optimizer", "muon"), "--optimizer muon is not supported with --fsdp"),
                        (("--ema",), "--ema with --fsdp is not supported yet"),
                        (("--ddp",), "--fsdp and --ddp are two ways"),
                        (("--optimizer", "adamw8bit"), "--optimizer adamw8bit is not supported with --fsdp"),
                        ((), "--fsdp needs torchrun")):
        assert tl.main(run_args("--fsdp", *extra)) == 2, extra
        assert said in capsys.readouterr().err, extra


def test_fsdp_settings_without_fsdp_are_refused(run_args, capsys):
    assert tl.main(run_args("--no-fsdp_reshard_after_forward")) == 2
    assert "--fsdp_reshard_after_forward is for --fsdp" in capsys.readouterr().err


def test_a_resume_that_cannot_keep_the_global_batch_is_refused():
    ckpt = {"world_size": 2, "config": {"batch_size": 4, "grad_accum_steps": 1}}
    with pytest.raises(tl.TinyLLMError, match="global batch of 8 sequences .* is not a multiple of 12.*"
                                              "resume on a number of ranks that divides it"):
        tl.keep_global_batch(tl.Config(batch_size=4), ckpt, tl.Dist(0, 0, 3))
    with pytest.raises(tl.TinyLLMError, match="give a --batch_size that divides 2"):
        tl.keep_global_batch(tl.Config(batch_size=4), ckpt, tl.Dist(0, 0, 4))
    assert tl.keep_global_batch(tl.Config(batch_size=2), ckpt, tl.Dist(0, 0, 1)).grad_accum_steps == 4
