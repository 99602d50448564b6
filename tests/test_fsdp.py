"""--fsdp: PyTorch FSDP2 under torchrun (gloo on CPU), sharded checkpoints, resume on another world size."""

import dataclasses
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


def ema_losses(out: Path) -> list[float]:
    return [json.loads(line)["ema_val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"ema_val_loss"' in line]


@pytest.mark.slow
def test_fsdp_is_ddp_sharded_and_resumes_on_any_world_size(tmp_path):
    """20 float32 steps on 2 ranks with an EMA: --fsdp gives --ddp's losses, EMA losses and weights
    within 1e-5; its checkpoint is a folder of shards, from which 2 ranks resume exactly (each
    reading its own shards) and so does one process (the global batch kept by twice the
    accumulation), and which every single-process mode reads; a DDP checkpoint resumes under
    --fsdp on 4 ranks."""
    corpus = make_corpus(tmp_path / "corpus.txt")
    common = ["--data_path", str(corpus), "--cache_dir", str(tmp_path / "cache"), *TINY, "--dtype", "float32",
              "--max_steps", "20", "--eval_interval", "5", "--ema"]
    ddp, fsdp, alone = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "alone"
    torchrun(2, *common, "--out_dir", str(ddp))
    done = torchrun(2, *common, "--out_dir", str(fsdp), "--fsdp", "--stop_at_step", "10")
    assert "(FSDP: weights, gradients and optimizer state sharded)" in done.stdout
    shards = {p.name for p in (fsdp / "ckpt.pt").iterdir()}
    assert (fsdp / "ckpt.pt").is_symlink() and {"__0_0.distcp", "__1_0.distcp", "state.pt"} <= shards
    assert losses(fsdp) == pytest.approx(losses(ddp)[:10], abs=1e-5)
    shutil.copytree(fsdp, alone, symlinks=True)
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
    done = torchrun(2, "--out_dir", str(fsdp), "--resume")  # each rank reads its own shards
    assert "resume: --fsdp, as the checkpoint was trained" in done.stdout and "(FSDP:" in done.stdout
    assert tl.main(["--out_dir", str(alone), "--resume"]) == 0  # one process, no torchrun
    for out in (fsdp, alone):
        assert losses(out) == pytest.approx(losses(ddp), abs=1e-5)
        assert ema_losses(out) == pytest.approx(ema_losses(ddp), abs=1e-5)
    whole = tl.load_checkpoint(ddp / "ckpt.pt")
    for resumed in (tl.load_checkpoint(fsdp / "ckpt.pt"), tl.load_checkpoint(alone / "ckpt.pt")):
        assert whole["model"].keys() == resumed["model"].keys() == resumed["ema"]["model"].keys()
        for name, w in whole["model"].items():
            assert torch.allclose(w, resumed["model"][name], atol=1e-5), name
            assert torch.allclose(whole["ema"]["model"][name], resumed["ema"]["model"][name], atol=1e-5), name
    kept = [p for p in (fsdp / "shards").iterdir() if p.name.startswith("ckpt-")]
    assert kept == [(fsdp / "ckpt.pt").resolve()]  # the older shards went
    assert (alone / "ckpt.pt").is_file()  # resumed whole: its old shards went
    assert not [p for p in (alone / "shards").iterdir() if p.name.startswith("ckpt-")]
    # a DDP checkpoint (and its EMA) resumed under --fsdp on 4 ranks, the global batch of 8 kept
    done = torchrun(4, "--out_dir", str(ddp), "--resume", "--fsdp", "--max_steps", "22", "--batch_size", "1")
    assert "--grad_accum_steps 1 -> 2 keeps the global batch of 8 sequences" in done.stdout
    assert torch.load(ddp / "ckpt.pt" / "state.pt", weights_only=True)["step"] == 22


@pytest.mark.slow
def test_fsdp_starts_from_a_transformers_model_each_rank_reading_its_shard(tmp_path):
    """--init_from a transformers directory (a random tiny GPT-2: tied embeddings, Conv1D weights
    stored transposed, learned positions cut to the context) with LoRA and an EMA: --fsdp, its
    weights and adapters made per shard on the meta device, gives --ddp's losses (the first
    evaluation and checkpoint come before any step, whose optimizer state must not be made by a
    step of its own); only the adapters train, and the sharded checkpoint holds them alone."""
    import transformers
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_layer=2, n_head=4, n_embd=32, n_positions=64)).save_pretrained(hf)
    corpus = make_corpus(tmp_path / "corpus.txt")
    (hf / "tokenizer.json").write_text(tl.train_bpe_tokenizer(iter([corpus.read_text()]), 300).to_str())
    common = ["--data_path", str(corpus), "--cache_dir", str(tmp_path / "cache"), *TINY, "--dtype", "float32",
              "--init_from", str(hf), "--lora_rank", "4", "--ema"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(2, *common, "--out_dir", str(ddp))
    done = torchrun(2, *common, "--out_dir", str(fsdp), "--fsdp")
    assert "4,096 trainable parameters" in done.stdout  # the adapters of 2 blocks, no positions
    assert len(losses(fsdp)) == 6 and losses(fsdp) == pytest.approx(losses(ddp), abs=1e-5)
    assert ema_losses(fsdp) == pytest.approx(ema_losses(ddp), abs=1e-5)
    adapters = tl.load_checkpoint(fsdp / "ckpt.pt")["model"]
    assert adapters and all(".lora_" in k for k in adapters)
    assert tl.main(["--generate_only", "--out_dir", str(fsdp), "--max_new_tokens", "4",
                    "--no-compile_decode"]) == 0


def test_each_rank_reads_only_the_rows_it_holds(tmp_path, monkeypatch):
    """model_from_source under --fsdp (two ranks played in one process): of every tensor a rank
    reads only its own rows, and the ranks' rows put together are the whole model's weights."""
    import transformers
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=260, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32)).save_pretrained(hf)
    (hf / "tokenizer.json").write_text(tl.train_bpe_tokenizer(iter(["ab cd ef " * 50]), 260).to_str())
    source = th.load_source(hf)
    cfg = tl.build_config({"block_size": 16}, base=th.source_defaults(source))
    whole = dict(th.model_from_source(cfg, source, torch.device("cpu"), 261).named_parameters())
    reads, read = [], source.read
    source = dataclasses.replace(source, read=lambda name, rows=None: reads.append((name, rows))
                                 or read(name, rows))
    for rank in (0, 1):
        held: dict[int, torch.Tensor] = {}

        def rows(p, rank=rank):  # the rank's chunk of the rows, as FSDP2's Shard(0) cuts them
            chunk = -(-p.shape[0] // 2)
            return min(rank * chunk, p.shape[0]), min((rank + 1) * chunk, p.shape[0])

        def part(p, held=held, rows=rows):
            lo, hi = rows(p)
            return held.setdefault(id(p), torch.full((hi - lo, *p.shape[1:]), float("nan")))
        monkeypatch.setattr(th, "held_rows", rows)
        monkeypatch.setattr(th, "local_part", part)
        reads.clear()
        model = th.model_from_source(cfg, source, torch.device("cpu"), 261)
        for name, p in model.named_parameters():
            lo, hi = rows(p)
            assert torch.equal(held[id(p)], whole[name][lo:hi]), (rank, name)  # the new 261st row: the mean
        # each held row read once, and nothing else but, where a rank holds a new token's row, the
        # source rows it averages
        sliced = sum(r.stop - r.start for _, r in reads if r is not None)
        src_rows = {ours: sum(source.spec(n)[0][0] for n in names) for ours, names in source.tensors.items()}
        assert sliced == sum(max(0, min(rows(p)[1], src_rows[n]) - rows(p)[0])
                             for n, p in model.named_parameters())
        averaged = {name for name, r in reads if r is None}
        assert averaged == (set() if rank == 0 else {"model.embed_tokens.weight", "lm_head.weight"})


def test_what_fsdp_cannot_do_is_refused_by_name(run_args, capsys):
    for extra, said in ((("--optimizer", "muon"), "--optimizer muon is not supported with --fsdp"),
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
