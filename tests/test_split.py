"""The house split in rooms: train_tinyllm.py, the card, runs alone; its siblings plug in through
the entries it declares, form layers, and a missing one is refused in one line naming its file."""

import ast
import concurrent.futures
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_corpus, th, tl

ROOT = Path(__file__).resolve().parents[1]
SIBLINGS = ("tinyllm_data", "tinyllm_hub", "tinyllm_serve", "tinyllm_evals", "tinyllm_tune")
LAYERS = {"train_tinyllm": 0, "tinyllm_data": 1, "tinyllm_evals": 1, "tinyllm_hub": 2, "tinyllm_serve": 2,
          "tinyllm_tune": 2}
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def imported_modules(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (at its top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found |= {n for n in names if n in LAYERS}
    return found


def test_modules_form_layers_and_the_card_imports_none():
    """Each module imports only what lies below it; the card imports no sibling by name at all
    (it loads one through `sibling` when an entry is used), so there can be no cycle."""
    for module, layer in LAYERS.items():
        below = imported_modules(ROOT / f"{module}.py")
        assert all(LAYERS[m] < layer for m in below), (module, below)
    assert imported_modules(ROOT / "train_tinyllm.py") == set()


@pytest.mark.slow
def test_importing_the_card_imports_no_sibling():
    code = "import sys, train_tinyllm; print(sorted(m for m in sys.modules if m.startswith('tinyllm_')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=ENV,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_every_declared_entry_is_implemented_by_its_module():
    """With the siblings imported (conftest does), no entry of any registry is left declared only."""
    registries = [v for v in vars(tl).values() if isinstance(v, tl.Registry)]
    assert len(registries) >= 12
    for registry in registries:
        for name, entry in registry.items():
            assert not getattr(entry, "home", ""), (registry.what, name)
    assert {mode.flag for mode in tl.MODES.values()} >= {"chat", "serve", "export", "generate_only"}


def test_every_architecture_field_is_mapped_or_refused_by_exports():
    """No silent exports: every model field of Config has a rule in EXPORTED_FIELDS, and one
    without a rule is refused by name at any value but its default."""
    assert set(tl.ARCH_KEYS) == set(th.EXPORTED_FIELDS)
    cfg = tl.build_config({"qk_norm": True, "n_layer": 1})
    assert th.hf_layout(cfg) == "qwen3"
    rules = {k: v for k, v in th.EXPORTED_FIELDS.items() if k != "qk_norm"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(th, "EXPORTED_FIELDS", rules)
        with pytest.raises(tl.TinyLLMError, match="--qk_norm has no place in transformers' GPT-2"):
            th.hf_layout(cfg)
        assert th.hf_layout(tl.build_config({"n_layer": 1})) == "llama"  # at its default: nothing to say


def test_an_mlp_declares_its_own_hidden_width(monkeypatch):
    """A new MLP class is one entry: the width comes from the class, not from its name."""
    class SquaredReLU(tl.GeluMLP):
        @staticmethod
        def hidden_size(width: int) -> int:
            return 3 * width

        def forward(self, x):
            return self.out_proj(torch.relu(self.fc(x)) ** 2)
    monkeypatch.setitem(tl.MLPS, "relu2", SquaredReLU)
    model = tl.GPT(tl.build_config({"mlp": "relu2", "n_layer": 1, "n_embd": 32}), 10)
    assert model.blocks[0].mlp.fc.out_features == 96


@pytest.fixture
def alone(tmp_path: Path) -> Path:
    """An empty folder with the card alone in it, and a small corpus."""
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(ROOT / "train_tinyllm.py", folder)
    make_corpus(folder / "corpus.txt")
    return folder


def card(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_tinyllm.py", *args], cwd=folder, capture_output=True,
                          text=True, timeout=240, env=ENV)


def cards(runs: list[tuple[Path, list[str]]]) -> list[subprocess.CompletedProcess]:
    """Independent invocations (folder, arguments) at once: each spends most of its time
    importing torch."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda run: card(run[0], *run[1]), runs))


@pytest.mark.slow
def test_the_card_alone_trains_resumes_samples_evaluates_and_benchmarks(alone):
    run = ["--data_path", "corpus.txt", "--out_dir", "out", "--cache_dir", "cache", *TINY]
    first = card(alone, *run, "--stop_at_step", "3")
    assert first.returncode == 0 and "continue with" in first.stdout, first.stderr
    resumed = card(alone, *run, "--resume")
    assert resumed.returncode == 0 and "resume: continuing" in resumed.stdout, resumed.stderr
    assert "done: step 6" in resumed.stdout
    sample = card(alone, "--generate_only", "--out_dir", "out", "--max_new_tokens", "8", "--prompt", "the")
    assert sample.returncode == 0 and sample.stdout.startswith("--- sample 1/1 ---\nthe"), sample.stderr
    evaluated = card(alone, "--eval_only", "--out_dir", "out", "--cache_dir", "cache")
    assert evaluated.returncode == 0 and "next-token accuracy" in evaluated.stdout, evaluated.stderr
    bench = card(alone, "--benchmark", "--data_path", "corpus.txt", "--cache_dir", "cache", *TINY)
    assert bench.returncode == 0 and "training tokens/s" in bench.stdout, bench.stderr
    assert "no decode row for --quantize int8, since --quantize int8 needs tinyllm_serve.py" in bench.stdout
    assert "KV cache, int8 weights" not in bench.stdout and not (alone / "tinyllm_serve.py").exists()
    bpe = card(alone, *run, "--out_dir", "bpe", "--tokenizer", "bpe", "--bpe_vocab_size", "300",
               "--max_steps", "1")
    assert bpe.returncode == 0, bpe.stderr
    if "pip install tiktoken" not in bpe.stdout:  # tiktoken there: the fast encoder is the sibling's
        assert "encoding with the tokenizers library, since the fast tiktoken encoder needs tinyllm_data.py" \
            in bpe.stdout


@pytest.mark.slow
def test_a_flag_whose_module_is_missing_is_one_line_naming_the_file(alone, tmp_path):
    trained = card(alone, "--data_path", "corpus.txt", "--out_dir", "out", "--cache_dir", "cache", *TINY,
                   "--max_steps", "2")
    assert trained.returncode == 0, trained.stderr
    before = sorted(p.name for p in (alone / "out").iterdir())
    (alone / "c.jsonl").write_text('{"text": "a b c"}\n')
    (alone / "c.txt.gz").write_bytes(b"not read")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    cases = {
        ("--serve", "--out_dir", "out"): "--serve needs tinyllm_serve.py",
        ("--chat", "--out_dir", "out"): "--chat needs tinyllm_serve.py",
        ("--export", "gguf", "--out_dir", "out"): "--export needs tinyllm_hub.py",
        ("--generate_only", "--out_dir", "out", "--quantize", "int8"):
            "--quantize int8 needs tinyllm_serve.py",
        ("--data_path", "c.jsonl", "--out_dir", "new"): "--data_path c.jsonl needs tinyllm_data.py",
        ("--data_path", "c.txt.gz", "--out_dir", "new"): "--data_path c.txt.gz needs tinyllm_data.py",
        ("--init_from", str(tmp_path / "hf"), "--out_dir", "new"): "--init_from needs tinyllm_hub.py",
    }
    for (args, message), out in zip(cases.items(), cards([(alone, list(args)) for args in cases])):
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, out.stderr)
        assert "which is not beside train_tinyllm.py" in lines[0]
    assert sorted(p.name for p in (alone / "out").iterdir()) == before and not (alone / "new").exists()


@pytest.mark.slow
def test_a_sibling_whose_own_module_is_missing_or_broken_is_one_line(tmp_path):
    """The hub without tinyllm_data.py (which it imports), an empty data module, a broken one:
    each is one line naming the file, exit 2, never a traceback."""
    def folder(name: str, **files: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        shutil.copy(ROOT / "train_tinyllm.py", path)
        for module, text in files.items():
            source = (ROOT / f"{module}.py").read_text() if text == "copy" else text
            (path / f"{module}.py").write_text(source)
        make_corpus(path / "corpus.txt")
        (path / "c.jsonl").write_text('{"text": "a b c"}\n' * 50)
        return path
    cases = [
        (folder("hub_only", tinyllm_hub="copy"), ["--init_from", "corpus.txt"],
         "--init_from needs tinyllm_hub.py and tinyllm_data.py, which is not beside train_tinyllm.py"),
        (folder("empty_data", tinyllm_data=""), ["--data_path", "c.jsonl"],
         "--data_path c.jsonl: tinyllm_data.py does not implement it"),
        (folder("broken_data", tinyllm_data="def (:"), ["--data_path", "c.jsonl"],
         "--data_path c.jsonl needs tinyllm_data.py, which cannot be imported (SyntaxError"),
        (folder("data_needs_a_package", tinyllm_data="import no_such_package_here\n"),
         ["--data_path", "c.jsonl"],
         "needs tinyllm_data.py, which cannot be imported (ModuleNotFoundError: No module named 'no_such"),
        (folder("hub_with_empty_data", tinyllm_hub="copy", tinyllm_data=""), ["--init_from", "corpus.txt"],
         "--init_from needs tinyllm_hub.py and tinyllm_data.py, which cannot be imported (ImportError"),
    ]
    outs = cards([(where, [*args, "--out_dir", "out", "--cache_dir", "cache", *TINY])
                  for where, args, _ in cases])
    for (where, _, message), out in zip(cases, outs):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], (where.name, out.stderr)
        assert not (where / "out").exists()


@pytest.mark.slow
def test_refusals_come_before_any_work_and_a_checkpoints_setting_falls_back(alone):
    """A --val_data file whose reader is missing is refused before the training corpus is read
    and before an existing out_dir is touched; a --quantize int8 that the checkpoint's config
    carries falls back to none with one line."""
    run = ["--data_path", "corpus.txt", "--out_dir", "out", "--cache_dir", "cache", *TINY, "--max_steps", "2"]
    assert card(alone, *run).returncode == 0
    (alone / "v.jsonl").write_text('{"text": "a b c"}\n')
    before = {p.name: p.stat().st_mtime_ns for p in (alone / "out").iterdir()}
    (alone / "packed").mkdir()
    (alone / "packed" / "a.txt.gz").write_bytes(b"not read")
    refusals = ((["--val_data", "v.jsonl"], "--val_data v.jsonl needs tinyllm_data.py"),
                (["--val_data", "packed"], "--val_data packed/a.txt.gz needs tinyllm_data.py"),
                (["--data_path", "packed/a.txt.gz"], "--data_path packed/a.txt.gz needs tinyllm_data.py"))
    outs = cards([(alone, [*run, "--overwrite", *extra]) for extra, _ in refusals])
    for (extra, message), out in zip(refusals, outs):
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)
        after = {p.name: p.stat().st_mtime_ns for p in (alone / "out").iterdir()}
        assert "data:" not in out.stdout and after == before, extra
    ckpt = torch.load(alone / "out" / "ckpt.pt", weights_only=True)
    ckpt["config"]["quantize"] = "int8"  # as a run trained with --quantize int8 (for its samples) saves it
    ckpt["config"]["data_path"] = "v.jsonl"  # what it was trained on does not matter for sampling
    torch.save(ckpt, alone / "out" / "ckpt_best.pt")
    sample = card(alone, "--generate_only", "--out_dir", "out", "--max_new_tokens", "4")
    assert sample.returncode == 0, sample.stderr
    assert "the checkpoint's config sets --quantize int8, but --quantize int8 needs tinyllm_serve.py" \
        in sample.stderr and "using --quantize none instead" in sample.stderr
    refused = card(alone, "--generate_only", "--out_dir", "out", "--quantize", "int8")
    assert refused.returncode == 2 and "--quantize int8 needs tinyllm_serve.py" in refused.stderr
