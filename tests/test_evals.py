"""--eval_tasks: benchmark files in their datasets' layouts, formatted as lm-evaluation-harness's
stock tasks format them, scored through the KV cache (checked against the plain forward pass),
and, where lm-eval is installed, agreeing with lm-eval itself on an --export hf of the model."""

import json
import math
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, td, te, tl

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and dog ran far away then came back home to eat".split()
ALPHABET = string.ascii_letters + string.digits + " .,:;?!'()_-\n"


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def hellaswag_records(rng: random.Random, n: int) -> list[dict]:
    return [{"ind": i, "activity_label": "cat", "ctx_a": sentence(rng, rng.randint(2, 6)),
             "ctx_b": sentence(rng, rng.randint(1, 3)), "ctx": "",
             "endings": [sentence(rng, rng.randint(1, 5)) for _ in range(4)], "label": str(rng.randrange(4))}
            for i in range(n)]


def arc_records(rng: random.Random, n: int) -> list[dict]:
    return [{"id": str(i), "question": sentence(rng, rng.randint(3, 7)),
             "choices": {"text": [sentence(rng, rng.randint(1, 3)) for _ in range(4)], "label": list("ABCD")},
             "answerKey": rng.choice("ABCD")} for i in range(n)]


def winogrande_records(rng: random.Random, n: int) -> list[dict]:
    return [{"sentence": f"{sentence(rng, rng.randint(1, 4))} _ {sentence(rng, rng.randint(2, 5))}",
             "option1": rng.choice(WORDS), "option2": rng.choice(WORDS), "answer": rng.choice("12")}
            for _ in range(n)]


def plain_records(rng: random.Random, n: int) -> list[dict]:
    return [{"context": sentence(rng, rng.randint(2, 8)),
             "choices": [sentence(rng, rng.randint(1, 4)) for _ in range(rng.randint(2, 4))],
             "gold": 0} for _ in range(n)]


def char_tok() -> tl.TextTokenizer:
    return tl.train_char_tokenizer(ALPHABET)


def tiny_model(vocab: int, **kw) -> tl.GPT:
    torch.manual_seed(0)
    cfg = tl.build_config({"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 48, **kw})
    model = tl.GPT(cfg, vocab).eval()
    with torch.no_grad():  # large random weights: every token's log-likelihood depends on its context
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * 1.5 / p.size(1) ** 0.5)
    return model


# ---- the layouts, as lm-eval's stock tasks format them ----------------------------------------

def test_each_layout_gives_lm_evals_prompt_choices_and_gold():
    hs = te.hellaswag({"activity_label": "Baking cookies", "ctx_a": "A woman puts dough [title] in.",
                       "ctx_b": "she", "endings": ["bakes it.", " eats  it [step]"], "label": "1"})
    assert hs.contexts == ("Baking cookies: A woman puts dough. in. She",)
    # lm-eval strips before it cuts the brackets out: the space before "[step]" stays
    assert hs.continuations == (" bakes it.", " eats it ") and hs.gold == 1
    assert hs.choices == ("bakes it.", "eats it ")
    a = te.arc({"question": "Which is a cat?", "choices": {"text": ["dog", "cat"], "label": ["1", "2"]},
                "answerKey": "2"})
    assert a.contexts == ("Question: Which is a cat?\nAnswer:",) and a.continuations == (" dog", " cat")
    assert a.gold == 1
    p = te.piqa({"goal": "open a jar", "sol1": "twist", "sol2": "pull", "label": 0})
    assert p.contexts == ("Question: open a jar\nAnswer:",) and p.continuations == (" twist", " pull")
    w = te.winogrande({"sentence": "The cat ate because _ was hungry.", "option1": "cat", "option2": "dog",
                       "answer": "2"})
    assert w.contexts == ("The cat ate because cat", "The cat ate because dog")
    assert w.continuations == (" was hungry.",) and w.gold == 1
    assert w.requests() == [("The cat ate because cat", " was hungry."),
                            ("The cat ate because dog", " was hungry.")]
    lam = te.lambada({"text": "he opened the door and saw his  friend"})
    assert lam.contexts == ("he opened the door and saw his ",) and lam.continuations == (" friend",)
    m = te.mmlu({"question": " What is 2+2? ", "subject": "elementary_mathematics",
                 "choices": ["1", "2", "3", "4"], "answer": 3})
    assert m.contexts == ("The following are multiple choice questions (with answers) about elementary "
                          "mathematics.\n\nWhat is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:",)
    assert m.continuations == (" A", " B", " C", " D") and m.gold == 3
    pl = te.plain({"context": "2+2 =", "choices": ["4", "5"], "gold": 0})
    assert pl.requests() == [("2+2 =", " 4"), ("2+2 =", " 5")]


def test_the_layout_is_found_from_the_fields_and_can_be_forced(tmp_path):
    rng = random.Random(0)
    tok = char_tok()
    files = {"hellaswag": hellaswag_records(rng, 3), "arc": arc_records(rng, 3),
             "winogrande": winogrande_records(rng, 3), "plain": plain_records(rng, 3),
             "piqa": [{"goal": "a cat", "sol1": "sat", "sol2": "ran", "label": 1}],
             "mmlu": [{"question": "a cat", "choices": ["a", "b", "c", "d"], "answer": 2}],
             "lambada": [{"text": "the cat sat on a mat"}]}
    for name, recs in files.items():
        task = te.load_task(write_jsonl(tmp_path / f"{name}.jsonl", recs), "auto", tok)
        assert task.format == name and len(task.items) == len(recs) and not task.malformed
    forced = te.load_task(tmp_path / "lambada.jsonl", "lambada", tok)
    assert forced.format == "lambada"
    with pytest.raises(tl.TinyLLMError, match="match no task layout.*--task_format"):
        te.load_task(write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x"}]), "auto", tok)


def test_a_malformed_record_is_counted_and_named_by_its_line_never_dropped_silently(tmp_path, capsys):
    tok = char_tok()
    recs = [{"context": "the cat", "choices": ["sat", "ran"], "gold": 1},
            "{not json",
            {"context": "the cat", "choices": ["sat", "ran"]},
            {"context": "the cat", "choices": ["sat", "ran"], "gold": 5},
            {"context": "the cat", "choices": ["sat"], "gold": 0},
            {"context": "the cat", "choices": ["sat", "€"], "gold": 0},
            {"context": "the dog", "choices": ["sat", "ran"], "gold": 0}]
    task = te.load_task(write_jsonl(tmp_path / "t.jsonl", recs), "auto", tok)
    assert len(task.items) == 2
    assert [n for n, _ in task.malformed] == [2, 3, 4, 5, 6]
    said = te.describe_malformed(task)
    assert said.startswith("5 record(s) not scored: line 2 (not JSON")
    assert "line 3 (no field 'gold')" in said and "line 4 (answer 5 is not one of the 2 choices" in said
    assert "line 6 (characters the tokenizer cannot encode: '€')" in said
    model = tiny_model(tok.vocab_size)
    te.evaluate_tasks(model, tok, str(tmp_path / "t.jsonl"), "auto", 0, torch.device("cpu"), torch.float32)
    assert "5 record(s) not scored" in capsys.readouterr().out


def test_parquet_and_a_json_list_are_read_as_json_lines_are(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    recs = arc_records(random.Random(1), 5)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "arc.parquet")
    (tmp_path / "arc.json").write_text(json.dumps(recs))
    tok = char_tok()
    items = [te.load_task(tmp_path / name, "auto", tok).items for name in ("arc.parquet", "arc.json")]
    assert items[0] == items[1] == te.load_task(write_jsonl(tmp_path / "arc.jsonl", recs), "auto", tok).items


# ---- scoring: the cached path against the plain forward pass ---------------------------------

def oracle_loglikelihood(model: tl.GPT, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval's rule through the uncached forward pass: the last window + 1 tokens, all but the
    last fed, the continuation's log-probabilities summed."""
    whole = (ctx + cont)[-(model.cfg.block_size + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0][0, -len(cont):]
    logp = F.log_softmax(logits.float(), -1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("arch", [dict(arch="llama", n_kv_head=2), dict(arch="gpt2")])
def test_cached_scores_are_the_plain_forward_passes(arch, monkeypatch):
    tok = char_tok()
    model = tiny_model(tok.vocab_size, **arch)
    rng = random.Random(2)
    items = [te.plain({"context": sentence(rng, rng.randint(0, 12)),
                       "choices": [sentence(rng, rng.randint(1, 6)) for _ in range(rng.randint(2, 4))],
                       "gold": 0})
             for _ in range(30)]
    items += [te.winogrande(r) for r in winogrande_records(rng, 5)]
    monkeypatch.setattr(te, "TOKENS_PER_BATCH", 200)  # many batches, rows of many lengths in each
    monkeypatch.setattr(te, "LOGITS_PER_CHUNK", 5000)
    start = [tok.eot_id]
    groups, n = te.request_groups(tok, items, model.cfg.block_size, start)
    assert any(len(g.continuations) > 1 for g in groups)  # contexts shared by their choices
    lls, greedy = te.loglikelihoods(model, groups, n, torch.device("cpu"), torch.float32)
    pairs = [te.encode_pair(tok, c, x, start) for item in items for c, x in item.requests()]
    assert any(len(c) + len(x) > model.cfg.block_size + 1 for c, x in pairs)  # some are cut to the window
    for (ctx, cont), ll, g in zip(pairs, lls, greedy):
        want, want_greedy = oracle_loglikelihood(model, ctx, cont[-model.cfg.block_size:])
        assert ll == pytest.approx(want, abs=1e-4) and g == want_greedy


def test_encode_pair_moves_the_contexts_trailing_space_and_an_empty_context_starts_from_eot():
    tok = char_tok()
    ctx, cont = te.encode_pair(tok, "the cat ", "sat", [99])
    assert tok.decode(ctx) == "the cat" and tok.decode(cont) == " sat"
    assert te.encode_pair(tok, "", " sat", [99]) == ([99], tok.encode(" sat"))


def test_task_chat_makes_each_context_the_users_turn_and_each_choice_the_reply():
    tok = char_tok()
    tok.hf.add_special_tokens(list(tl.CHATML_TOKENS))
    tok = tl.TextTokenizer(tok.hf)
    item = te.plain({"context": "the cat", "choices": ["sat", "ran"], "gold": 0})
    render = tl.task_renderer(tl.build_config({"task_chat": True}), tok)
    groups, n = te.request_groups(tok, [item], 256, [tok.eot_id], render)
    turn = td.render_chat(tl.CHATML, [{"role": "user", "content": "the cat"}], generation_prompt=True)
    # the reply follows the assistant header; its newline moves to the continuation, by lm-eval's rule
    assert n == 2 and len(groups) == 1 and groups[0].prefix == tok.encode(turn.rstrip())
    assert [tok.decode(c) for c in groups[0].continuations] == ["\nsat", "\nran"]  # no space before the reply
    assert tok.vocab_special["<|im_start|>"] in groups[0].prefix  # the markers as their special tokens
    with pytest.raises(tl.TinyLLMError, match="--task_chat is for chat models"):
        tl.task_renderer(tl.build_config({"task_chat": True}), char_tok())


def test_metrics_are_lm_evals_acc_acc_norm_stderr_and_chance():
    items = [te.plain({"context": "c", "choices": ["a", "bbbb"], "gold": 1}),
             te.plain({"context": "c", "choices": ["a", "bb", "c"], "gold": 0})]
    task = te.Task("t", Path("t.jsonl"), "plain", items)
    lls = [-1.0, -2.0, -1.0, -1.5, -3.0]  # item 1: acc picks a (wrong), acc_norm -2/4 > -1/1 picks bbbb
    r = te.task_metrics(task, lls, [True] * 5)
    assert r["acc"] == 0.5 and r["acc_norm"] == 0.5 + 0.0 * r["acc"]
    assert r["acc_stderr"] == pytest.approx(math.sqrt(0.5 / 2))  # sample sd sqrt(0.5), over sqrt(2)
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    lam = te.Task("l", Path("l.jsonl"), "lambada", [te.lambada({"text": "a b"}), te.lambada({"text": "c d"})])
    r = te.task_metrics(lam, [-1.0, -3.0], [True, False])
    assert r["acc"] == 0.5 and r["perplexity"] == pytest.approx(math.exp(2.0)) and "chance" not in r


# ---- the command line ------------------------------------------------------------------------

def tiny_run(tmp_path: Path, *extra: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(3)
    corpus.write_text("\n".join(sentence(rng, 10) for _ in range(300)) + "\n" + ALPHABET + "\n")
    out = tmp_path / "out"
    assert tl.main(["--data_path", str(corpus), "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
                    *TINY, *extra]) == 0
    return out


def test_eval_only_scores_task_files_and_folders_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rng = random.Random(4)
    write_jsonl(tasks / "hellaswag.jsonl", hellaswag_records(rng, 12))
    write_jsonl(tasks / "wino.jsonl", winogrande_records(rng, 8))
    write_jsonl(tmp_path / "lambada.jsonl", [{"text": sentence(rng, 6)} for _ in range(5)])
    out = tiny_run(tmp_path)
    capsys.readouterr()
    argv = ["--eval_only", "--out_dir", str(out), "--device", "cpu"]
    result = tl.main([*argv, "--eval_tasks", f"{tasks},{tmp_path / 'lambada.jsonl'}",
                      "--eval_tasks_limit", "10"])
    said = capsys.readouterr().out
    assert result == 0
    assert "hellaswag (hellaswag, 10 items" in said and "acc_norm" in said and "chance 25.00%" in said
    assert "wino (winogrande, 8 items" in said and "chance 50.00%" in said
    assert "lambada (lambada, 5 items" in said and "perplexity" in said
    for bad, says in ((str(tmp_path / "missing.jsonl"), "does not exist"),
                      (str(tmp_path / "corpus.txt"), "is not a task file")):
        assert tl.main([*argv, "--eval_tasks", bad]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    assert tl.main([*argv, "--eval_tasks", str(tmp_path / "lambada.jsonl"), "--quantize", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    assert tl.main([*argv, "--eval_tasks", str(tasks), "--eval_tasks_limit", "-1"]) == 2
    assert tl.main(["--generate_only", "--out_dir", str(out), "--eval_tasks", str(tasks)]) == 2
    assert "--eval_tasks is for --eval_only and training" in capsys.readouterr().err
    assert tl.main([*argv, "--eval_tasks_limit", "5"]) == 2
    assert "go with --eval_tasks" in capsys.readouterr().err
    assert tl.main([*argv, "--eval_tasks", str(tasks), "--task_chat"]) == 2  # a plain-text model
    assert "--task_chat is for chat models" in capsys.readouterr().err


def test_training_scores_the_tasks_at_each_evaluation_into_metrics_and_the_eval_line(tmp_path, capsys):
    task = write_jsonl(tmp_path / "arc.jsonl", arc_records(random.Random(5), 6))
    out = tiny_run(tmp_path, "--eval_tasks", str(task), "--eval_tasks_limit", "4")
    said = capsys.readouterr().out
    assert "| arc acc_norm " in said
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert len(evals) >= 2 and all(0 <= r["arc/acc"] <= 1 and "arc/acc_norm" in r for r in evals)
    if (out / "loss.png").exists():  # matplotlib is there: the accuracies have their own axis
        assert tl.plot_metrics(out).stat().st_size > 0


@pytest.mark.slow
def test_under_torchrun_the_items_are_split_over_the_ranks_and_the_scores_are_one_process_s(tmp_path):
    task = write_jsonl(tmp_path / "plain.jsonl", plain_records(random.Random(8), 40))
    out = tiny_run(tmp_path)
    argv = ["--eval_only", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32",
            "--eval_tasks", str(task)]
    alone = subprocess.run([sys.executable, str(ROOT / "train_tinyllm.py"), *argv], capture_output=True,
                           text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train_tinyllm.py"), *argv], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout
    def figures(text: str) -> str:
        return text.split("):", 2)[-1].strip()  # the scores, after the task's name and its time
    assert figures(two.stdout) == figures(alone.stdout) and "acc_norm" in figures(two.stdout)


# ---- lm-evaluation-harness itself ------------------------------------------------------------

LM_EVAL_TASKS = {  # our layout -> the lm-eval task it is scored against, pointed at the same file
    "hellaswag": "include: {stock}/hellaswag/hellaswag.yaml",
    "arc": "include: {stock}/arc/arc_easy.yaml",
    "winogrande": "include: {stock}/winogrande/default.yaml",
    "plain": ("output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
              "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm"),
}


def lm_eval_scores(lm_eval, yamls: Path, model: str, args: str, tasks: list[str], **kw) -> dict:
    """lm-eval's own acc and acc_norm of `tasks` (in `yamls`, which include its stock tasks by
    path: its index of every other task is not built), run in this process."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(yamls), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, device="cpu", bootstrap_iters=0,
                                  log_samples=False, task_manager=manager, **kw)
    return out["results"]


@pytest.mark.slow
def test_lm_evaluation_harness_agrees_on_an_hf_export_and_through_serve(tmp_path, monkeypatch):
    """Our scores against lm-eval's: its stock tasks pointed at the same files, on an --export hf
    of the model (200 items of each layout), and its local-completions model through --serve
    (the prompt's log-probabilities: echo, logprobs, max_tokens 1), float32 both."""
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(name, value)
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval[hf,api])")
    from conftest import serving
    stock = Path(lm_eval.__file__).parent / "tasks"
    out = tiny_run(tmp_path, "--n_embd", "48", "--block_size", "128", "--max_steps", "30",
                   "--dtype", "float32")
    hf = tmp_path / "hf"
    assert tl.main(["--export", "hf", "--out_dir", str(out), "--export_dir", str(hf)]) == 0
    rng = random.Random(6)
    makers = {"hellaswag": hellaswag_records, "arc": arc_records, "winogrande": winogrande_records,
              "plain": plain_records}
    yamls = tmp_path / "yamls"
    yamls.mkdir()
    for name, make in makers.items():
        recs = make(rng, 200)
        if name == "plain":
            for r in recs:
                r["gold"] = rng.randrange(len(r["choices"]))
        write_jsonl(tmp_path / f"{name}.jsonl", recs)
        (yamls / f"{name}.yaml").write_text(
            LM_EVAL_TASKS[name].format(stock=stock) + f"\ntask: ours_{name}\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    validation: {tmp_path / name}.jsonl\n"
            f"training_split: null\nvalidation_split: validation\ntest_split: null\n")
    r = tl.resolve(["--eval_only", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32",
                    "--eval_tasks", ",".join(str(tmp_path / f"{n}.jsonl") for n in makers)])
    scores = tl.evaluate_checkpoint(r)["tasks"]

    def agree(theirs: dict, names: list[str]) -> None:
        for name in names:
            for metric in ("acc", "acc_norm") if name != "winogrande" else ("acc",):
                ours_value, their_value = scores[name][metric], theirs[f"ours_{name}"][f"{metric},none"]
                assert abs(ours_value - their_value) <= 0.005, (name, metric, ours_value, their_value)

    theirs = lm_eval_scores(lm_eval, yamls, "hf", f"pretrained={hf},dtype=float32",
                            [f"ours_{n}" for n in makers], batch_size=16)
    agree(theirs, list(makers))
    served = ["plain", "arc"]  # the prompt's scores through the API, as a hosted model is evaluated
    r = tl.resolve(["--eval_only", "--out_dir", str(out), "--device", "cpu", "--dtype", "float32",
                    "--eval_tasks", ",".join(str(tmp_path / f"{n}.jsonl") for n in served),
                    "--eval_tasks_limit", "100"])
    scores = tl.evaluate_checkpoint(r)["tasks"]
    with serving(out, "--dtype", "float32", "--no-compile_decode") as server:
        args = (f"base_url={server.url}/v1/completions,model={server.served.model_id},tokenizer={hf},"
                f"tokenizer_backend=huggingface,tokenized_requests=True,max_length=128,num_concurrent=1,"
                f"max_retries=1")
        theirs = lm_eval_scores(lm_eval, yamls, "local-completions", args, [f"ours_{n}" for n in served],
                                batch_size=8, limit=100)
    agree(theirs, served)
