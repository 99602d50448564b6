"""After supervised training: preference tuning (--objective dpo: DPO, IPO, conservative DPO, SimPO)
and RL from a reward function (--objective grpo), checked against TRL where it is installed."""

import copy
import io
import json
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY, th, tl, tt

WORDS = ["cat", "dog", "sun", "mat", "red", "big", "run", "far", "sky", "sea"]


def styled_corpus(path: Path, n: int = 600) -> Path:
    """Lines 'w w w: reply' with replies in lower case and upper case alike."""
    rng = random.Random(0)
    lines = []
    for i in range(n):
        reply = " ".join(rng.choice(WORDS) for _ in range(2))
        lines.append(f"{' '.join(rng.choice(WORDS) for _ in range(3))}: {reply.upper() if i % 2 else reply}")
    path.write_text("\n".join(lines) + "\n")
    return path


def pairs_file(path: Path, n: int = 240, seed: int = 1) -> Path:
    """The same reply, chosen in upper case and rejected in lower case."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            reply = " ".join(rng.choice(WORDS) for _ in range(2))
            prompt = " ".join(rng.choice(WORDS) for _ in range(3)) + ":"
            f.write(
                json.dumps({"prompt": prompt, "chosen": " " + reply.upper(), "rejected": " " + reply}) + "\n"
            )
    return path


def prompts_file(path: Path, n: int = 120) -> Path:
    rng = random.Random(2)
    path.write_text(
        "".join(
            json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(3)) + ":"}) + "\n"
            for _ in range(n)
        )
    )
    return path


REWARD = """
def score(prompt, completion, record):
    return sum(c.isupper() for c in completion) / max(1, len(completion))

def text(prompt, completion, record):
    return "high"

def nan(prompt, completion, record):
    return float("nan")

def huge(prompt, completion, record):
    return 10**400

def exits(prompt, completion, record):
    raise SystemExit(0)

def empty_fails(prompt, completion, record):
    return 1 / len(completion)
"""

SMALL = [*TINY[:6], "--block_size", "32", *TINY[8:]]  # TINY with room for a prompt and its reply


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny char model that has seen replies in both styles."""
    root = tmp_path_factory.mktemp("tune")
    corpus = styled_corpus(root / "base.txt")
    out = root / "base"
    assert (
        tl.main(
            [
                *SMALL,
                "--data_path",
                str(corpus),
                "--out_dir",
                str(out),
                "--cache_dir",
                str(root / "cache"),
                "--max_steps",
                "40",
                "--eval_interval",
                "40",
                "--batch_size",
                "16",
            ]
        )
        == 0
    )
    (root / "rewards.py").write_text(REWARD)
    return {
        "root": root,
        "ckpt": out / "ckpt.pt",
        "pairs": pairs_file(root / "pairs.jsonl"),
        "prompts": prompts_file(root / "prompts.jsonl"),
        "reward": root / "rewards.py",
    }


def tune_args(base, out: str, *extra: str) -> list[str]:
    return [
        *SMALL,
        "--init_from",
        str(base["ckpt"]),
        "--out_dir",
        str(base["root"] / out),
        "--cache_dir",
        str(base["root"] / "cache"),
        *extra,
    ]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the loss, against TRL's DPOTrainer -----------------------------------------------------


def gpt_of(path: Path, **settings) -> tl.GPT:
    ckpt = torch.load(path, weights_only=True)
    cfg = tl.Config(**{**ckpt["config"], **settings})
    model = tl.GPT(cfg, ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    return model


def fake_run(cfg, model, reference):
    return types.SimpleNamespace(
        cfg=cfg, device=torch.device("cpu"), kept={}, reference=reference, model=model, dtype=torch.float32
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradient_are_trls_on_the_same_token_ids(base, loss_type):
    """Our --objective dpo loss and its gradient against TRL's DPOTrainer on an --export hf of the same
    policy and reference, the same token ids (TRL's own tokenization) and beta, in float32."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -r requirements-dev.txt)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = base["root"]
    policy_dir = root / "policy"
    if not (policy_dir / "ckpt.pt").exists():  # the policy: the base trained on a little further
        assert (
            tl.main(
                tune_args(
                    base,
                    "policy",
                    "--data_path",
                    str(root / "base.txt"),
                    "--objective",
                    "lm",
                    "--learning_rate",
                    "3e-2",
                )
            )
            == 0
        )
        for ckpt in (base["ckpt"], policy_dir / "ckpt.pt"):
            assert tl.main(["--export", "hf", "--ckpt", str(ckpt), "--out_dir", str(ckpt.parent)]) == 0
    hf_tok = AutoTokenizer.from_pretrained(policy_dir / "export-hf")
    hf_policy = AutoModelForCausalLM.from_pretrained(policy_dir / "export-hf", dtype=torch.float32)
    hf_ref = AutoModelForCausalLM.from_pretrained(base["ckpt"].parent / "export-hf", dtype=torch.float32)
    rows = [json.loads(line) for line in base["pairs"].read_text().splitlines()[:6]]
    # TRL 1.16 changes the outputs of a ref_model object it is handed (its fused-head patch), so the
    # reference's log-probabilities come from transformers' own forward pass of the reference export,
    # given to TRL's loss as its precomputed ones; TRL makes the tokens, the policy pass and the loss
    args = trl.DPOConfig(
        output_dir=str(root / "trl"),
        beta=0.3,
        loss_type=[loss_type],
        report_to="none",
        per_device_train_batch_size=6,
        use_cpu=True,
        max_length=None,
        precompute_ref_log_probs=True,
    )
    trainer = trl.DPOTrainer(
        model=hf_policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=hf_tok
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        logits = hf_ref(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        picked = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        ref = (picked * batch["completion_mask"][:, 1:]).sum(-1)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    ids, seen, completion = (
        batch["input_ids"],
        batch["attention_mask"].bool(),
        batch["completion_mask"].bool(),
    )
    B = len(ids) // 2
    pairs = [
        tt.Pair(
            ids[i][seen[i] & ~completion[i]].tolist(),
            ids[i][completion[i]].tolist(),
            ids[B + i][completion[B + i]].tolist(),
        )
        for i in range(B)
    ]
    ours = gpt_of(policy_dir / "ckpt.pt")
    cfg = tl.Config(**{**tl.asdict(ours.cfg), "objective": "dpo", "dpo_beta": 0.3, "dpo_loss": loss_type})
    loss, figures = tt.pair_figures(fake_run(cfg, ours, gpt_of(base["ckpt"])), ours, pairs, "train", None)
    loss.backward()
    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    assert 0 < figures["rewards/accuracies"] < 1 or loss_type == "ipo"  # a real mix, not a trivial batch

    grads = copy.deepcopy(ours)  # our gradients, mapped to the export's tensor names as the weights are
    for g, p in zip(grads.parameters(), ours.parameters()):
        g.data = p.grad
    mapped = th.family_tensors(grads, th.hf_layout(ours.cfg))
    theirs = dict(hf_policy.named_parameters())
    assert set(theirs) <= set(mapped)
    for name, p in theirs.items():
        assert torch.allclose(mapped[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_the_variants_follow_their_formulas_and_simpo_needs_no_reference():
    """Conservative DPO (label smoothing), IPO and SimPO on hand-made log-probabilities."""
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    lc, lr = torch.tensor([2.0]), torch.tensor([4.0])
    ls = torch.nn.functional.logsigmoid
    cfg = tl.Config(dpo_beta=0.5, dpo_label_smoothing=0.2)
    losses, chosen, rejected = tt.preference_losses(pc, pr, rc, rr, lc, lr, cfg)
    margin = (pc - rc) - (pr - rr)
    assert torch.allclose(losses, -0.8 * ls(0.5 * margin) - 0.2 * ls(-0.5 * margin))
    assert torch.allclose(chosen, 0.5 * (pc - rc)) and torch.allclose(rejected, 0.5 * (pr - rr))
    ipo = tt.preference_losses(pc, pr, rc, rr, lc, lr, tl.Config(dpo_beta=0.5, dpo_loss="ipo"))[0]
    assert torch.allclose(ipo, ((pc - rc) / lc - (pr - rr) / lr - 1.0) ** 2)
    simpo = tt.preference_losses(
        pc, pr, None, None, lc, lr, tl.Config(dpo_beta=2.0, dpo_loss="simpo", simpo_gamma=0.4)
    )
    assert torch.allclose(simpo[0], -ls(2.0 * (pc / lc - pr / lr - 0.2)))
    assert torch.allclose(simpo[1], 2.0 * pc / lc)


# ---- layouts ---------------------------------------------------------------------------------


def test_the_layouts_people_have_give_prompt_and_responses():
    """TRL's standard and conversational layouts, UltraFeedback's message lists (the prompt inside
    them) and Anthropic HH's strings (the prompt up to the last shared assistant turn)."""
    std = tt.pair_texts({"prompt": "Q", "chosen": " a", "rejected": " b"}, "x", chat=False)
    assert std == ("Q", " a", " b")
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    assert tt.pair_texts(hh, "x", chat=False) == ("\n\nHuman: hi\n\nAssistant:", " hello there", " go")
    assert tt.pair_texts(hh, "x", chat=True) == (
        [{"role": "user", "content": "hi"}],
        [{"role": "assistant", "content": "hello there"}],
        [{"role": "assistant", "content": "go"}],
    )
    user = {"role": "user", "content": "hi"}
    uf = {
        "prompt": "hi",
        "chosen": [user, {"role": "assistant", "content": "A"}],
        "rejected": [user, {"role": "assistant", "content": "B"}],
    }
    assert tt.pair_texts(uf, "x", chat=True) == (
        [user],
        [{"role": "assistant", "content": "A"}],
        [{"role": "assistant", "content": "B"}],
    )
    conv = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    }
    assert tt.pair_texts(conv, "x", chat=True)[0] == [user]
    with pytest.raises(tl.TinyLLMError, match="line 3 has no 'rejected'"):
        tt.pair_texts({"prompt": "Q", "chosen": "a"}, "f.jsonl line 3", chat=False)


def test_a_pair_that_prefers_nothing_is_refused_and_an_empty_prompt_starts_from_end_of_text(base):
    tok = tl.TextTokenizer.from_str(torch.load(base["ckpt"], weights_only=True)["tokenizer"])
    for chosen, rejected, said in ((" a", " a", "are the same"), ("", " b", "a response is empty"),
                                   (" ", " b", "a response is empty")):
        with pytest.raises(tl.TinyLLMError, match=said):
            tt.pair_ids(tok, "", "cat:", chosen, rejected, "f.jsonl line 2")
    prompt, chosen, _ = tt.pair_ids(tok, "", "", " cat", " dog", "x")
    assert prompt == [tok.eot_id] and chosen == tok.encode(" cat") + [tok.eot_id]


def test_a_pair_too_long_is_cut_from_the_prompts_start():
    prompt, (c, r), cut = tt.cut_to_context(list(range(10)), [[1, 2, 3], [4, 5]], 8)
    assert cut and prompt == list(range(5, 10)) and c == [1, 2, 3] and r == [4, 5]
    assert tt.cut_to_context([1, 2], [[3]], 8) == ([1, 2], [[3]], False)
    prompt, (c,), cut = tt.cut_to_context([1, 2, 3], [list(range(20))], 8)
    assert prompt == [3] and len(c) == 7


# ---- refusals ---------------------------------------------------------------------------------

GROUPS = ("--batch_size", "8", "--grpo_group", "4")


def test_bad_input_is_refused_in_one_line_before_any_step(base, capsys):
    root = base["root"]
    no_rejected = root / "bad.jsonl"
    no_rejected.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n" + base["pairs"].read_text())
    pairs, prompts, reward = str(base["pairs"]), str(base["prompts"]), f"{base['reward']}:score"
    dpo, grpo = ("--objective", "dpo", "--data_path", pairs), ("--objective", "grpo", "--data_path", prompts)
    cases = {
        "no --init_from": ([*SMALL, *dpo, "--out_dir", str(root / "r0")], "give --init_from"),
        "no rejected": (tune_args(base, "r1", "--objective", "dpo", "--data_path", str(no_rejected)),
                        "bad.jsonl line 1 has no 'rejected'"),
        "a flag of another objective": (tune_args(base, "r2", *dpo, "--grpo_group", "4"),
                                        "--grpo_group is for --objective grpo"),
        "no reward": (tune_args(base, "r3", *grpo, *GROUPS), "needs --reward"),
        "no such function": (tune_args(base, "r4", *grpo, "--reward", f"{base['reward']}:missing", *GROUPS),
                             "has no function missing"),
        "no reward file": (tune_args(base, "r5", *grpo, "--reward", f"{no_rejected}.py:score", *GROUPS),
                           "there is no file"),
        "greedy groups": (tune_args(base, "r6", *grpo, "--reward", reward, "--temperature", "0", *GROUPS),
                          "--temperature 0"),
        "batch not in groups": (tune_args(base, "r7", *grpo, "--reward", reward, "--grpo_group", "3"),
                                "multiple of --grpo_group"),
        "curriculum": (tune_args(base, "r8", *dpo, "--curriculum", "--curriculum_start_block_size", "8"),
                       "--curriculum is for --objective lm, and this run's is dpo"),
        "simpo and precompute": (tune_args(base, "r9", *dpo, "--dpo_loss", "simpo", "--dpo_precompute_ref"),
                                 "SimPO has no reference"),
        "a corpus setting": (tune_args(base, "r10", *dpo, "--text_field", "t"),
                             "--text_field is for --objective lm"),
        "a reward that fails on an empty completion": (
            tune_args(base, "r11", *grpo, "--reward", f"{base['reward']}:empty_fails", *GROUPS),
            "(tried on an empty completion first) raised ZeroDivisionError",
        ),
        "a tuning flag outside training": (
            ["--generate_only", "--out_dir", str(base["ckpt"].parent), "--dpo_beta", "0.2"],
            "--dpo_beta is for training",
        ),
        "not training": (["--generate_only", "--out_dir", str(base["ckpt"].parent), "--objective", "dpo"],
                         "--objective is for training"),
    }
    for name, (argv, expected) in cases.items():
        assert tl.main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, (name, err)
        assert not Path(argv[argv.index("--out_dir") + 1]).exists() or "training" in name, name


@pytest.mark.parametrize("fn, said", [("text", "returned 'high' (str) for"),
                                      ("nan", "returned 'nan' (float) for"), ("huge", "returned '1000000"),
                                      ("exits", "raised SystemExit (0) on")])
def test_a_reward_that_is_not_a_finite_number_names_the_record(base, fn, said):
    split = tt.PromptSplit(
        [tt.Prompt([1], "p", {"prompt": "p"}, "prompts.jsonl line 7")],
        [0],
        "",
        tt.load_reward(f"{base['reward']}:{fn}"),
    )
    with pytest.raises(tl.TinyLLMError, match=re.escape(said) + ".* the record at prompts.jsonl line 7"):
        tt.reward_of(split.reward, split.prompts[0], "x", f"rewards.py:{fn}")


# ---- reference: precomputed, LoRA with its adapters off ----------------------------------------


def test_precomputed_reference_gives_the_losses_of_the_frozen_copy(base, capsys):
    """--dpo_precompute_ref: the same first-step losses as the frozen copy, the table kept in the
    checkpoint; a resume reads it back."""
    common = (
        "--objective",
        "dpo",
        "--data_path",
        str(base["pairs"]),
        "--max_steps",
        "2",
        "--eval_interval",
        "2",
        "--log_interval",
        "1",
    )
    assert tl.main(tune_args(base, "copy", *common)) == 0
    assert "a frozen copy of the starting weights" in capsys.readouterr().out
    assert tl.main(tune_args(base, "pre", *common, "--dpo_precompute_ref")) == 0
    assert "computing the log-probabilities of 240 pairs once" in capsys.readouterr().out
    a, b = records(base["root"] / "copy"), records(base["root"] / "pre")
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "rewards/margins", "val_rewards/margins"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5, (key, x[key], y[key])
    table = torch.load(base["root"] / "pre" / "ckpt.pt", weights_only=True)["objective_state"]["ref_logps"]
    assert table["train"].shape[1] == 2 and len(table["train"]) + len(table["val"]) == 240
    assert (
        tl.main(tune_args(base, "pre", *common, "--dpo_precompute_ref", "--resume", "--max_steps", "3")) == 0
    )
    assert "(from the checkpoint)" in capsys.readouterr().out
    # the flag off on a resume: the table goes, the reference is the starting weights again (from
    # --init_from); another beta scores the pairs otherwise, so the best starts over
    more = ("--resume", "--max_steps", "4", "--dpo_beta", "0.2", "--no-dpo_precompute_ref")
    assert tl.main(tune_args(base, "pre", *common, *more)) == 0
    said = capsys.readouterr().out
    assert "a frozen copy of the starting weights" in said and "--dpo_beta differs" in said
    kept = torch.load(base["root"] / "pre" / "ckpt.pt", weights_only=True)["objective_state"]
    assert "ref_logps" not in kept
    assert tl.main(["--eval_only", "--out_dir", str(base["root"] / "pre")]) == 2  # pairs: no text to measure
    assert "give --eval_data (a text file) or --eval_tasks" in capsys.readouterr().err


def test_with_lora_the_reference_is_the_model_with_its_adapters_off(base):
    model = gpt_of(base["ckpt"])
    cfg = tl.Config(**{**tl.asdict(model.cfg), "lora_rank": 2, "init_from": str(base["ckpt"])})
    th.add_lora(model, cfg)
    plain = gpt_of(base["ckpt"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # trained adapters: the model now differs from its base
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.ones_like(ids, dtype=torch.float)
    run = fake_run(cfg, model, None)
    assert not torch.allclose(tt.token_logps(model, ids, mask), tt.token_logps(plain, ids, mask))
    assert torch.allclose(tt.reference_logps(run, ids, mask), tt.token_logps(plain, ids, mask), atol=1e-6)
    assert not torch.allclose(tt.token_logps(model, ids, mask), tt.token_logps(plain, ids, mask))  # back on


# ---- shown to learn, and used as any run -------------------------------------------------------


@pytest.mark.slow
def test_dpo_makes_a_tiny_model_prefer_the_chosen_style_then_resumes_exports_and_chats(base, capsys):
    out = base["root"] / "dpo"
    argv = tune_args(
        base,
        "dpo",
        "--objective",
        "dpo",
        "--data_path",
        str(base["pairs"]),
        "--batch_size",
        "16",
        "--max_steps",
        "40",
        "--eval_interval",
        "20",
        "--log_interval",
        "10",
        "--eval_iters",
        "4",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "5",
        "--stop_at_step",
        "20",
    )
    assert tl.main(argv) == 0
    assert tl.main([*argv[:-2], "--resume"]) == 0
    evals = [r for r in records(out) if "val_rewards/accuracies" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    print("dpo curve:", [(r["step"], round(r["val_loss"], 4), r["val_rewards/accuracies"]) for r in evals])
    assert evals[-1]["val_rewards/accuracies"] >= 0.9 and evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    logs = [r for r in records(out) if "rewards/chosen" in r]
    assert logs and all(k in logs[-1] for k in ("rewards/rejected", "rewards/margins", "rewards/accuracies"))
    capsys.readouterr()
    assert tl.main(["--export", "safetensors", "--out_dir", str(out)]) == 0
    assert (
        tl.main(
            [
                "--generate_only",
                "--out_dir",
                str(out),
                "--prompt",
                "cat sun sky:",
                "--temperature",
                "0",
                "--max_new_tokens",
                "6",
                "--device",
                "cpu",
                "--no-compile_decode",
            ]
        )
        == 0
    )
    reply = capsys.readouterr().out.split("cat sun sky:")[-1]
    assert sum(c.isupper() for c in reply) > sum(c.islower() for c in reply), reply


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_of_a_tiny_model_and_resumes(base):
    """A verifiable task: the share of upper-case characters in the completion."""
    out = base["root"] / "grpo"
    flags = ("--objective grpo --batch_size 16 --grpo_group 8 --grpo_completion_tokens 8 --temperature 1 "
             "--max_steps 30 --eval_interval 10 --log_interval 5 --eval_iters 8 --learning_rate 3e-3 "
             "--warmup_steps 3 --grpo_iters 2 --grpo_kl 0.01").split()
    argv = tune_args(base, "grpo", *flags, "--data_path", str(base["prompts"]),
                     "--reward", f"{base['reward']}:score")
    assert tl.main([*argv, "--stop_at_step", "15"]) == 0
    assert tl.main([*argv, "--resume"]) == 0
    evals = [r for r in records(out) if "val_reward" in r]
    print("grpo curve:", [(r["step"], round(r["val_reward"], 3)) for r in evals])
    assert [r["step"] for r in evals] == [0, 10, 15, 20, 30]
    assert evals[-1]["val_reward"] > evals[0]["val_reward"] + 0.3
    logs = [r for r in records(out) if "reward" in r]
    assert all(k in logs[-1] for k in ("reward_std", "completion_length", "clip_ratio", "kl"))
    assert any(r["clip_ratio"] > 0 for r in logs)  # with --grpo_iters 2 the second step can clip
    assert tl.main(["--export", "hf", "--out_dir", str(out)]) == 0


def test_a_chat_model_is_tuned_on_conversational_pairs_with_lora_then_chats(base, monkeypatch, capsys):
    """A chat model: TRL's conversational layout rendered through its template, the reference being
    the model with its LoRA adapters off; the tuned checkpoint chats as any other."""
    root = base["root"]
    convs = root / "chat.jsonl"
    rng = random.Random(3)
    with open(convs, "w") as f:
        for _ in range(200):
            word = rng.choice(WORDS)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": word},
                            {"role": "assistant", "content": word.upper()},
                        ]
                    }
                )
                + "\n"
            )
    pairs = root / "chat_pairs.jsonl"
    with open(pairs, "w") as f:
        for word in WORDS * 4:
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": word}],
                        "chosen": [{"role": "assistant", "content": word.upper()}],
                        "rejected": [{"role": "assistant", "content": word}],
                    }
                )
                + "\n"
            )
    chat = root / "chat"
    assert (
        tl.main(
            [
                *SMALL,
                "--data_path",
                str(convs),
                "--out_dir",
                str(chat),
                "--cache_dir",
                str(root / "cache"),
                "--max_steps",
                "10",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = root / "chat_dpo"
    assert (
        tl.main(
            [
                *SMALL,
                "--objective",
                "dpo",
                "--init_from",
                str(chat / "ckpt.pt"),
                "--data_path",
                str(pairs),
                "--out_dir",
                str(out),
                "--lora_rank",
                "2",
                "--max_steps",
                "3",
                "--eval_interval",
                "3",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "rendered through the chat template" in said and "adapters switched off (no copy held)" in said
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model"] and all(".lora_" in k for k in ckpt["model"])
    monkeypatch.setattr("sys.stdin", io.StringIO("cat\n/exit\n"))
    assert (
        tl.main(
            [
                "--chat",
                "--out_dir",
                str(out),
                "--temperature",
                "0",
                "--max_new_tokens",
                "6",
                "--no-compile_decode",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 1
    # GRPO on the chat model: prompts as conversations ending with the user's turn, through its template
    prompts = root / "chat_prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": w}], "answer": w.upper()}) + "\n"
            for w in WORDS * 2
        )
    )
    (root / "exact.py").write_text(
        "def score(prompt, completion, record):\n"
        "    return float(completion.strip() == record['answer']) + (prompt in WORDS)\n"
        f"WORDS = {WORDS!r}\n"
    )
    flags = ("--objective grpo --batch_size 4 --grpo_group 4 --grpo_completion_tokens 6 --temperature 1 "
             "--max_steps 2 --eval_interval 2 --eval_iters 1 --lora_rank 2 --grpo_kl 0.1").split()
    assert tl.main([*SMALL, *flags, "--init_from", str(chat / "ckpt.pt"), "--data_path", str(prompts),
                    "--out_dir", str(root / "chat_grpo"), "--reward", f"{root / 'exact.py'}:score"]) == 0
    assert "adapters switched off" in capsys.readouterr().out  # LoRA: the KL's reference holds no copy
    logs = [r for r in records(root / "chat_grpo") if "reward" in r]
    assert logs and all(r["reward"] >= 1 and r["kl"] >= 0 for r in logs)  # the user's turn came as the prompt


@pytest.mark.slow
def test_dpo_is_the_same_eager_compiled_and_under_torchrun_and_grpo_runs_there(base):
    """LoRA DPO: the same losses and margins eager, compiled (--compile) and split over two torchrun
    ranks (gloo); GRPO's prompts split over two ranks too."""
    common = (
        "--objective",
        "dpo",
        "--data_path",
        str(base["pairs"]),
        "--lora_rank",
        "2",
        "--max_steps",
        "3",
        "--eval_interval",
        "3",
        "--log_interval",
        "1",
        "--dtype",
        "float32",  # the same figures: bf16 kernels, where the CPU has them, round by their own order
    )
    eager = tl.train(tl.resolve(tune_args(base, "l-eager", *common, "--batch_size", "4")))
    compiled = tl.train(tl.resolve(tune_args(base, "l-compiled", *common, "--batch_size", "4", "--compile")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(tl.__file__).resolve()),
    ]
    two = subprocess.run(
        [*torchrun, *tune_args(base, "l-two", *common, "--batch_size", "2")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def logged(history, key):
        return [r[key] for r in history if "rewards/margins" in r]

    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert len(logged(eager, key)) == 3
        # at step 1 the policy is its reference: every pair a tie, which the compiled kernels'
        # rounding may tip, so accuracies (the share of positive margins) are compared after it
        first = 1 if key == "rewards/accuracies" else 0
        assert logged(compiled, key)[first:] == pytest.approx(logged(eager, key)[first:], abs=1e-4), key
        assert logged(records(base["root"] / "l-two"), key) == pytest.approx(logged(eager, key), abs=1e-5), (
            key
        )
    grpo = subprocess.run(
        [
            *torchrun,
            *tune_args(
                base,
                "g-two",
                "--objective",
                "grpo",
                "--data_path",
                str(base["prompts"]),
                "--reward",
                f"{base['reward']}:score",
                "--batch_size",
                "4",
                "--grpo_group",
                "4",
                "--grpo_completion_tokens",
                "4",
                "--temperature",
                "1",
                "--max_steps",
                "2",
                "--eval_interval",
                "2",
                "--eval_iters",
                "1",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    assert "2 process(es)" in grpo.stdout and [r for r in records(base["root"] / "g-two") if "reward" in r]


def test_simpo_and_conservative_dpo_are_trls_formulas():
    """SimPO (per-token log-probabilities, margin gamma) and label-smoothed DPO against TRL's
    CPOTrainer.cpo_loss, which implements both (CPO's sigmoid on the log-ratios is conservative DPO)."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install -r requirements-dev.txt)")
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 20 for _ in range(4))
    lc, lr = torch.tensor([3.0, 5, 8, 2, 9]), torch.tensor([4.0, 4, 7, 6, 1])

    def trl_loss(loss_type, chosen, rejected, beta, smoothing, gamma=0.0):
        fake = types.SimpleNamespace(
            alpha=0.0,
            beta=beta,
            label_smoothing=smoothing,
            loss_type=loss_type,
            simpo_gamma=gamma,
            accelerator=types.SimpleNamespace(device="cpu"),
        )
        return CPOTrainer.cpo_loss(fake, chosen, rejected)

    cfg = tl.Config(dpo_beta=2.0, dpo_loss="simpo", simpo_gamma=0.7, dpo_label_smoothing=0.1)
    ours = tt.preference_losses(pc, pr, None, None, lc, lr, cfg)
    theirs = trl_loss("simpo", pc / lc, pr / lr, 2.0, 0.1, 0.7)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)
    cfg = tl.Config(dpo_beta=0.3, dpo_label_smoothing=0.25)
    ours = tt.preference_losses(pc, pr, rc, rr, lc, lr, cfg)
    theirs = trl_loss("sigmoid", pc - rc, pr - rr, 0.3, 0.25)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)
