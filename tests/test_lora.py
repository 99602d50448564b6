"""LoRA (--lora_rank): adapters on a frozen model, small checkpoints that reference their base,
merged weights everywhere a model leaves training."""

import copy
import json

import pytest
import torch
from conftest import th, tl


def tiny(**settings) -> tl.GPT:
    cfg = tl.build_config({"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "n_kv_head": 2,
                           "init_from": "x", "lora_rank": 4, **settings})
    torch.manual_seed(0)
    return tl.GPT(cfg, 50).eval()


@pytest.mark.parametrize("targets", ["attn", "mlp", "attn,mlp"])
def test_adapters_start_at_the_base_and_merge_exactly(targets):
    settings = {"lora_targets": targets, "arch": "gpt2" if targets == "mlp" else "llama"}
    model, plain = tiny(**settings), tiny(**settings)
    idx = torch.randint(50, (2, 12))
    with torch.no_grad():
        base = model(idx)[0]
        th.add_lora(model, model.cfg)
        assert torch.equal(model(idx)[0], base)  # B = 0: the first step starts from the base model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        adapted = model(idx)[0]
        merged = th.merge_lora(copy.deepcopy(model))
        assert not tl.has_lora(merged) and set(merged.state_dict()) == set(plain.state_dict())
        assert (merged(idx)[0] - adapted).abs().max() < 1e-5 and (adapted - base).abs().max() > 1e-2
    def layers(m, lora):
        return {n.split(".", 2)[2].rsplit(".", 1)[0] for n, _ in m.named_parameters()
                if n.startswith("blocks.") and ("lora_" in n) == lora}
    expected = {n for t in targets.split(",") for n in tl.LORA_TARGETS[t]}
    assert layers(model, True) == expected & layers(plain, False)


def test_only_adapters_train_and_get_optimizer_state():
    model = th.add_lora(tiny(lora_dropout=0.1), tiny().cfg)
    opt = tl.make_optimizers(model, dataclass_replace(model.cfg, weight_decay=0.1), torch.device("cpu"))[0]
    optimized = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in optimized} == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    x = torch.randint(50, (2, 12))
    model(x, x)[1].backward()
    opt.step()
    for name, p in model.named_parameters():
        assert ("lora_" in name) == (p.grad is not None)
        if "lora_" not in name:
            assert torch.equal(p, before[name])  # frozen: untouched
    assert model.wte.weight is model.lm_head.weight  # the tied head is not adapted


def dataclass_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


@pytest.fixture
def base_run(run_args, tmp_path, capsys):
    """A tiny model trained here: the base the adapters are trained on."""
    assert tl.main(run_args(out="base")) == 0
    capsys.readouterr()
    return tmp_path / "base" / "ckpt.pt"


def lora_args(run_args, base, *extra, out="lora"):
    return run_args("--init_from", str(base), "--lora_rank", "4", "--lora_alpha", "8",
                    "--learning_rate", "1e-2", *extra, out=out)


def test_cli_lora_run_small_checkpoint_merged_everywhere(run_args, base_run, tmp_path, capsys):
    assert tl.main(lora_args(run_args, base_run, "--ema")) == 0
    out = capsys.readouterr().out
    assert "lora: rank 4 on attn,mlp" in out and "trainable parameters" in out
    ckpt = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)
    assert ckpt["model"] and all(".lora_" in k for k in ckpt["model"])
    assert all(".lora_" in k for k in ckpt["ema"]["model"])
    assert (tmp_path / "lora" / "ckpt.pt").stat().st_size < 0.5 * base_run.stat().st_size
    records = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learned
    # generation, evaluation and export all see merged weights; the export needs no adapter code
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "lora"), "--max_new_tokens", "5"]) == 0
    assert tl.main(["--eval_only", "--out_dir", str(tmp_path / "lora")]) == 0
    assert tl.main(["--export", "safetensors", "--out_dir", str(tmp_path / "lora")]) == 0
    exported = th.load_safetensors(tmp_path / "lora" / "export-safetensors" / "model.safetensors")
    assert exported["config"]["lora_rank"] == 0 and not any("lora" in k for k in exported["model"])
    # benchmarks score the merged weights: the adapters' checkpoint as its merged export
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"context": "the cat", "choices": [w, "a mat"], "gold": 0}) + "\n"
                            for w in ("sat", "ran far", "and dog", "on a")))
    merged_file = tmp_path / "lora" / "export-safetensors" / "model.safetensors"
    scores = [tl.evaluate_checkpoint(tl.resolve(["--eval_only", "--out_dir", str(tmp_path / "lora"),
                                                 "--eval_tasks", str(task), *ckpt]))["tasks"]["task"]
              for ckpt in ([], ["--ckpt", str(merged_file)])]
    assert {k: v for k, v in scores[0].items() if k != "seconds"} == \
        {k: v for k, v in scores[1].items() if k != "seconds"}
    r = tl.resolve(["--generate_only", "--out_dir", str(tmp_path / "lora"), "--ckpt",
                    str(tmp_path / "lora" / "ckpt.pt")])
    merged = tl.load_for_use(r).model
    plain = tl.GPT(tl.build_config({}, base=exported["config"]), exported["vocab_size"]).eval()
    plain.load_state_dict(exported["model"])
    idx = torch.randint(exported["vocab_size"], (1, 10))
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], merged(idx)[0])
    base = torch.load(base_run, weights_only=True)["model"]
    trained = merged.state_dict()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])  # adapted
    assert torch.equal(trained["wte.weight"], base["wte.weight"])  # not adapted, frozen


def test_lora_resume_is_exact(run_args, base_run, tmp_path, capsys):
    assert tl.main(lora_args(run_args, base_run, "--lora_dropout", "0.1", out="straight")) == 0
    assert tl.main(lora_args(run_args, base_run, "--lora_dropout", "0.1", "--stop_at_step", "3",
                             out="split")) == 0
    assert tl.main(lora_args(run_args, base_run, "--lora_dropout", "0.1", "--resume", "--lora_targets",
                             "mlp, attn", out="split")) == 0  # the same targets, written otherwise
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    capsys.readouterr()
    assert tl.main(lora_args(run_args, base_run, "--lora_rank", "8", "--resume", out="split")) == 2
    assert "--lora_rank 8 does not match" in capsys.readouterr().err


def test_a_moved_base_is_found_and_a_changed_one_refused(run_args, base_run, tmp_path, capsys):
    assert tl.main(lora_args(run_args, base_run)) == 0
    moved = tmp_path / "elsewhere" / "base.pt"
    moved.parent.mkdir()
    base_run.rename(moved)
    capsys.readouterr()
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be read" in err and "--init_from" in err and len(err.splitlines()) == 1
    # a copy of the same files is the same base, wherever it is and whatever its date
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "lora"), "--init_from", str(moved)]) == 0
    assert tl.main(lora_args(run_args, moved, "--resume", "--max_steps", "8")) == 0
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "lora")]) == 0  # it records the new place
    # another model in its place is refused
    assert tl.main(run_args("--seed", "7", out="other")) == 0
    (tmp_path / "other" / "ckpt.pt").replace(moved)
    capsys.readouterr()
    assert tl.main(["--export", "safetensors", "--out_dir", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert "whose files differ" in err and len(err.splitlines()) == 1


def test_lora_refusals(run_args, base_run, tmp_path, capsys):
    for extra, message in ((["--lora_rank", "4"], "give --init_from"),
                           (["--init_from", str(base_run), "--lora_rank", "4", "--optimizer", "muon"],
                            "with --lora_rank use"),
                           (["--init_from", str(base_run), "--lora_rank", "4", "--lora_targets", "attn,emb"],
                            "--lora_targets 'attn,emb'")):
        assert tl.main(run_args(*extra, out="refused")) == 2
        assert message in capsys.readouterr().err
    assert tl.main(lora_args(run_args, base_run)) == 0
    capsys.readouterr()
    assert tl.main(run_args("--init_from", str(tmp_path / "lora" / "ckpt.pt"), out="again")) == 2
    assert "holds LoRA adapters, not a whole model" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_compiled_and_on_two_ranks_follows_eager_one_process(run_args, base_run, tmp_path):
    """The adapters train alike compiled (torch.compile) and under DDP (2 gloo processes of
    batch B against one of 2B, with gradient accumulation): the frozen base needs no gradient
    sync, the adapters get it."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    common = ("--dtype", "float32", "--max_steps", "4", "--eval_interval", "4", "--grad_accum_steps", "2")
    eager = tl.train(tl.resolve(lora_args(run_args, base_run, *common, "--batch_size", "4", out="eager")))
    compiled = tl.train(tl.resolve(lora_args(run_args, base_run, *common, "--batch_size", "4", "--compile",
                                             out="compiled")))
    script = str(Path(tl.__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          script, *lora_args(run_args, base_run, *common, "--batch_size", "2", out="two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]

    def losses(history):
        return [r["loss"] for r in history if "loss" in r]
    assert len(losses(eager)) == 4
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
    assert losses(records) == pytest.approx(losses(eager), rel=1e-5)
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert all(".lora_" in k and not k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sampling_copy_is_merged_and_leaves_the_live_model_alone(dtype):
    model = th.add_lora(tiny(), tiny().cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    live = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cfg = dataclass_replace(model.cfg, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    sampler = tl.sampling_copy(model, cfg, torch.device("cpu"))
    assert not tl.has_lora(sampler) and sampler.wte.weight.dtype == dtype
    assert all(torch.equal(p, live[n]) and p.dtype == torch.float32 for n, p in model.state_dict().items())
    idx = torch.randint(50, (1, 10))
    with torch.no_grad():
        expected = th.merge_lora(copy.deepcopy(model)).to(dtype)(idx)[0]
        assert (sampler(idx)[0].float() - expected.float()).abs().max() < 1e-2


def test_lora_base_and_rank_refusals(run_args, base_run, tmp_path, capsys):
    assert tl.main(run_args("--init_from", str(base_run), "--lora_rank", "32", out="wide")) == 2
    assert "no low rank for layers 32 wide" in capsys.readouterr().err
    assert tl.main(run_args("--init_from", str(base_run), "--lora_rank", "4", "--overwrite", out="base")) == 2
    assert "lies in --out_dir" in capsys.readouterr().err
    assert tl.main(lora_args(run_args, base_run)) == 0
    capsys.readouterr()
    assert tl.main(["--export", "safetensors", "--out_dir", str(tmp_path / "lora"),
                    "--export_dir", str(tmp_path / "base")]) == 2
    assert "holds the base model" in capsys.readouterr().err
    assert (tmp_path / "base" / "ckpt.pt").is_file() and tl.main(["--generate_only", "--out_dir",
                                                                    str(tmp_path / "lora")]) == 0


def test_resuming_with_another_optimizer_is_refused(run_args, capsys):
    assert tl.main(run_args("--stop_at_step", "3")) == 0
    capsys.readouterr()
    assert tl.main(run_args("--resume", "--optimizer", "lion")) == 2
    err = capsys.readouterr().err
    assert "--optimizer lion is not the optimizer of" in err and "--init_from" in err


def test_perplexity_of_a_huge_loss_is_infinite():
    assert tl.perplexity(1.0) == pytest.approx(2.718281828) and tl.perplexity(5000.0) == float("inf")
