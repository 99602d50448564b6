"""Training engine: precision, compile, DDP, EMA, curriculum, checkpointing, optimizers,
schedules, regularization, exact resume and time budgets."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tl

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_tinyllm.py")


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


# ---- mixed precision -------------------------------------------------------------------------

def test_dtype_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = tl.has_native_bf16(cpu)
    assert tl.pick_dtype(tl.Config(), cpu) == (torch.bfloat16 if native else torch.float32)
    assert tl.pick_dtype(tl.Config(amp=False), cpu) == torch.float32
    assert tl.pick_dtype(tl.Config(dtype="float16"), cpu) == torch.float16
    monkeypatch.setattr(tl, "has_native_bf16", lambda d: False)  # an older GPU
    assert tl.pick_dtype(tl.Config(), cuda) == torch.float16
    assert tl.pick_dtype(tl.Config(), cpu) == torch.float32


def test_bf16_autocast_trains(run_args, capsys):
    history = tl.train(tl.resolve(run_args("--dtype", "bfloat16", "--max_steps", "20",
                                              "--learning_rate", "1e-2", "--warmup_steps", "0")))
    assert "bfloat16 autocast" in capsys.readouterr().out
    assert losses(history)[-1] < losses(history)[0] - 0.5


def test_fp16_overflow_steps_are_skipped_and_counted(run_args, monkeypatch, tmp_path, capsys):
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, init_scale=2.0**80, **k))
    history = tl.train(tl.resolve(run_args("--dtype", "float16", "--max_steps", "3")))
    assert [r["overflow_skips"] for r in history if "loss" in r] == [1, 2, 3]
    assert "fp16 overflow skips 3" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["overflow_skips"] == 3 and ckpt["scaler"]["scale"] < 2.0**80


# ---- torch.compile + curriculum --------------------------------------------------------------

@pytest.mark.slow
def test_compile_once_per_curriculum_stage(run_args, tmp_path):
    """Compiled training matches eager, keeps checkpoints free of _orig_mod., and compiles once
    per curriculum stage: evaluation and sampling use the raw model."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    args = ("--curriculum", "--curriculum_start_block_size", "8", "--curriculum_steps", "3",
            "--max_steps", "6", "--eval_interval", "2", "--sample_interval", "3", "--dtype", "float32")
    compiled = tl.train(tl.resolve(run_args(*args, "--compile", out="c")))
    eager = tl.train(tl.resolve(run_args(*args, out="e")))
    assert counters["stats"]["unique_graphs"] == 2  # contexts 8 and 16
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
    keys = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["model"].keys()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


def test_compile_without_a_cpp_compiler_trains_eagerly_with_one_line(run_args, monkeypatch, capsys):
    """A config that asks for --compile still trains on a CPU with no C++ compiler for inductor:
    eagerly, with one line saying why, and the engine line says eager."""
    torch._dynamo.reset()
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    tl.compiler_missing.cache_clear()
    try:
        history = tl.train(tl.resolve(run_args("--compile", "--max_steps", "2", "--dtype", "float32")))
    finally:
        tl.compiler_missing.cache_clear()
    out = capsys.readouterr()
    assert "training eagerly: no C++ compiler was found to compile the training step" in out.err
    assert "eager, 1 process(es)" in out.out
    assert len(losses(history)) >= 1


def test_curriculum_stages_keep_tokens_per_step():
    cfg = tl.Config(block_size=256, batch_size=8, max_steps=300, curriculum=True,
                    curriculum_start_block_size=32)
    contexts = [tl.context_at(s, cfg) for s in range(0, 300, 25)]
    assert contexts == [32, 32, 64, 128] + [256] * 8  # a third of the run: 3 stages, then full
    assert {tl.batch_at(t, cfg) * t for t in (32, 64, 128, 256)} == {8 * 256}
    assert tl.context_at(0, tl.Config(block_size=256)) == 256


# ---- gradient checkpointing ------------------------------------------------------------------

def saved_bytes(model, x, y):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y)[1]
    loss.backward()
    return loss.item(), total


def test_grad_checkpointing_same_loss_and_grads_less_memory():
    torch.manual_seed(0)
    model = tl.GPT(tl.Config(n_layer=4, n_embd=64, block_size=32, dropout=0.1), 50).train()
    x, y = torch.randint(50, (8, 32)), torch.randint(50, (8, 32))
    torch.manual_seed(1)
    plain_loss, plain_bytes = saved_bytes(model, x, y)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    torch.manual_seed(1)
    ckpt_loss, ckpt_bytes = saved_bytes(model, x, y)
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    for g, p in zip(plain_grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert ckpt_bytes < 0.5 * plain_bytes


# ---- optimizers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, lr", [("adamw", 3e-3), ("adamw8bit", 3e-3), ("lion", 1e-3), ("muon", 3e-3)])
def test_optimizers_reduce_loss(name, lr):
    torch.manual_seed(0)
    cfg = tl.Config(n_layer=2, n_embd=32, block_size=16, optimizer=name, learning_rate=lr)
    model = tl.GPT(cfg, 40)
    opts = tl.make_optimizers(model, cfg, torch.device("cpu"))
    x = torch.randint(40, (4, 17))
    first = None
    for _ in range(30):
        loss = model(x[:, :-1], x[:, 1:])[1]
        first = first if first is not None else loss.item()
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    assert loss.item() < first - 0.5


def test_muon_takes_hidden_matrices_only():
    model = tl.GPT(tl.Config(n_layer=2, n_embd=32, bias=True, norm="layernorm", tie_weights=False), 40)
    muon, rest = tl.make_optimizers(model, tl.Config(optimizer="muon"), torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(rest, torch.optim.AdamW)  # ours is torch's
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == (name.startswith("blocks.") and p.dim() == 2), name
    assert sum(len(g["params"]) for o in (muon, rest) for g in o.param_groups) == \
        len(list(model.parameters()))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_muon_is_torchs_with_the_orthogonalization_in_fp32_where_bf16_is_emulated(native_bf16, monkeypatch):
    """In bfloat16 (where the device has it) our Muon takes torch's steps exactly; elsewhere it
    orthogonalizes in float32, close to them; either way its state is torch's, so a checkpoint of
    one resumes in the other."""
    monkeypatch.setattr(tl, "has_native_bf16", lambda device: native_bf16)
    torch.manual_seed(0)
    model = tl.GPT(tl.Config(n_layer=1, n_embd=32, mlp="gelu"), 40)
    twin = copy.deepcopy(model)
    ours = tl.make_optimizers(model, tl.Config(optimizer="muon", learning_rate=0.01), torch.device("cpu"))[0]
    assert ours.ns_dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    params = [dict(twin.named_parameters())[n] for n, p in model.named_parameters()
              if any(p is q for q in ours.param_groups[0]["params"])]
    torchs = torch.optim.Muon(params, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    mine = [p for p in model.parameters() if any(p is q for q in ours.param_groups[0]["params"])]
    for _ in range(3):
        for a, b in zip(mine, params):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        torchs.step()
    gap = max((a - b).abs().max().item() for a, b in zip(mine, params))
    assert gap == 0 if native_bf16 else 0 < gap < 1e-3
    torchs.load_state_dict(ours.state_dict())
    assert torch.equal(torchs.state[params[0]]["momentum_buffer"], ours.state[mine[0]]["momentum_buffer"])


def test_lion_update_rule():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = tl.Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.2, -0.3, 0.0])
    opt.step()
    # decay by lr*wd, then step by -lr * sign(0.1 * grad) (momentum starts at 0)
    assert torch.allclose(p.detach(), torch.tensor([0.95 - 0.1, -0.95 + 0.1, 0.475]))
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.002, -0.003, 0.0]))


def test_adamw8bit_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(tl.TinyLLMError, match="pip install bitsandbytes"):
        tl.make_optimizers(tl.GPT(tl.Config(n_layer=1, n_embd=32), 10),
                           tl.Config(optimizer="adamw8bit"), torch.device("cpu"))


def test_adamw_is_fused_on_cpu():
    opt = tl.make_optimizers(tl.GPT(tl.Config(n_layer=1, n_embd=32), 10), tl.Config(),
                             torch.device("cpu"))[0]
    assert opt.defaults["fused"] is True


FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import train_tinyllm as tl
kept = tl.keep_freed_memory(tl.Config(keep_freed_memory={flag}), torch.device("cpu"))
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MB: over glibc's 32 MB limit for heap blocks; freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(kept, min(faults() for _ in range(3)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    def run(flag):
        code = FAULTS.format(root=str(Path(SCRIPT).parent), flag=flag)
        kept, faults = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.split()
        return kept == "True", int(faults)
    (kept_on, faults_on), (kept_off, faults_off) = run(True), run(False)
    assert kept_on and not kept_off
    assert faults_on < 1000 and faults_on < faults_off  # 64 MB is 16,384 pages of 4 KB
    assert not tl.keep_freed_memory(tl.Config(), torch.device("meta"))  # CPU runs only


# ---- schedules and regularization -------------------------------------------------------------

def test_schedules():
    base = dict(learning_rate=1.0, min_lr=0.0, warmup_steps=10, max_steps=110)
    wsd = tl.Config(lr_schedule="wsd", decay_fraction=0.2, **base)
    assert tl.lr_at(5, wsd) == 0.6 and tl.lr_at(50, wsd) == 1.0 and tl.lr_at(89, wsd) == 1.0
    assert tl.lr_at(100, wsd) == pytest.approx(0.5) and tl.lr_at(110, wsd) == 0.0
    const = tl.Config(lr_schedule="constant", **base)
    assert tl.lr_at(100, const) == 1.0
    timed = tl.Config(time_budget_s=100, **{**base, "max_steps": 10**9})
    assert tl.lr_at(20, timed, elapsed=50.0) == pytest.approx(0.5) and tl.lr_at(20, timed, 100.0) == 0.0


def test_label_smoothing_and_z_loss_change_training_loss_only():
    torch.manual_seed(0)
    model = tl.GPT(tl.Config(n_layer=1, n_embd=32, block_size=16), 30)
    x, y = torch.randint(30, (2, 16)), torch.randint(30, (2, 16))
    plain = model(x, y)[1]
    assert model(x, y, label_smoothing=0.1)[1] != plain
    logits = model(x)[0]
    expected = plain + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(model(x, y, z_loss=1e-2)[1], expected)


def test_logged_val_loss_is_plain_cross_entropy(run_args, tmp_path):
    frozen = ("--max_steps", "3", "--eval_interval", "3", "--learning_rate", "1e-9", "--min_lr", "0")
    regular = tl.train(tl.resolve(run_args(*frozen, out="r")))
    smoothed = tl.train(tl.resolve(run_args(*frozen, "--label_smoothing", "0.5", "--z_loss", "0.1",
                                               out="s")))
    # a near-zero learning rate keeps the weights the same: only the objective differs
    assert losses(smoothed)[0] > losses(regular)[0]
    v = [[r["val_loss"] for r in h if "val_loss" in r][-1] for h in (regular, smoothed)]
    assert v[1] == pytest.approx(v[0], abs=1e-4)


# ---- EMA -------------------------------------------------------------------------------------

def test_ema_update_rule():
    model = tl.GPT(tl.Config(n_layer=1, n_embd=32), 10)
    ema = tl.EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # warm-up decay min(0.9, 2/11)
    for b, e in zip(before, ema.model.parameters()):
        assert torch.allclose(e, b + (1 - 2 / 11))
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_ema_run_logs_both_and_saves_it(run_args, tmp_path):
    history = tl.train(tl.resolve(run_args("--ema", "--ema_decay", "0.9", "--max_steps", "9")))
    evals = [r for r in history if "val_loss" in r]
    assert all("ema_val_loss" in r for r in evals)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["ema"]["updates"] == 9
    best = min(min(r["val_loss"], r["ema_val_loss"]) for r in evals)
    assert ckpt["best_val_loss"] == best


# ---- exact resume and time budget --------------------------------------------------------------

def test_exact_resume_with_everything_on(run_args):
    """2N steps straight == N steps (--stop_at_step) then --resume, with dropout, EMA, gradient
    accumulation, fp16 GradScaler state, and the speedrun switches (ReLU², soft-capped logits,
    output projections starting at zero, U-net skips, the wsd schedule)."""
    common = ("--max_steps", "8", "--dropout", "0.1", "--ema", "--grad_accum_steps", "2",
              "--dtype", "float16", "--eval_interval", "2", "--mlp", "relu2", "--logit_softcap", "15",
              "--zero_init_out_proj", "--unet_skips", "--lr_schedule", "wsd")
    straight = tl.train(tl.resolve(run_args(*common, out="a")))
    tl.train(tl.resolve(run_args(*common, "--stop_at_step", "4", out="b")))
    resumed = tl.train(tl.resolve(run_args(*common, "--resume", "--stop_at_step", "0", out="b")))
    assert losses(straight)[4:] == losses(resumed)
    ema = [[r["ema_val_loss"] for r in h if "ema_val_loss" in r][-1] for h in (straight, resumed)]
    assert ema[0] == ema[1]


def test_time_budget_ends_decayed(run_args, tmp_path, capsys):
    history = tl.train(tl.resolve(run_args("--time_budget_s", "2", "--max_steps", "1000000",
                                              "--warmup_steps", "0", "--eval_interval", "1000000")))
    steps = [r for r in history if "loss" in r]
    assert 2 <= steps[-1]["elapsed_s"] < 4 and steps[-1]["step"] < 1000000
    peak, floor = steps[0]["lr"], tl.Config().min_lr  # laid out over the budget: fully decayed
    assert steps[-1]["lr"] - floor < 0.05 * (peak - floor)
    assert (tmp_path / "out" / "ckpt.pt").is_file() and "val_loss" in history[-1]


# ---- DDP -------------------------------------------------------------------------------------


def test_the_rank_comes_from_torchrun_only(monkeypatch, capsys):
    """Dist.from_environment is where the rank is read: printing and the DDP setup follow it."""
    monkeypatch.delenv("RANK", raising=False)
    assert tl.Dist.from_environment() is None and tl.init_distributed(tl.Config()) == tl.SINGLE_PROCESS
    with pytest.raises(tl.TinyLLMError, match="--ddp needs torchrun"):
        tl.init_distributed(tl.Config(ddp=True))
    tl.print0("from the only process")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert tl.Dist.from_environment() == tl.Dist(rank=1, local_rank=0, world_size=2)
    tl.print0("from rank 1")
    assert capsys.readouterr().out == "from the only process\n"


@pytest.mark.slow
def test_ddp_two_processes_match_one(run_args, tmp_path):
    """2 gloo processes of batch B follow the same loss trajectory as 1 process of batch 2B,
    with gradient accumulation (no_sync on all but the last micro-step); with the speedrun switches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ("--dtype", "float32", "--grad_accum_steps", "2", "--max_steps", "4", "--eval_interval", "4",
              "--mlp", "relu2", "--logit_softcap", "15", "--zero_init_out_proj", "--unet_skips")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", SCRIPT, *run_args(*common, "--batch_size", "2", out="two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and two.stdout.count("eval step 4") == 1  # rank 0 prints
    one = tl.train(tl.resolve(run_args(*common, "--batch_size", "4", out="one")))
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in metrics if "loss" in r] == pytest.approx(losses(one), rel=1e-5)
    assert torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["step"] == 4
