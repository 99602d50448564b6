"""The store of compiled decode steps (cache_dir/decode_steps): kept and found again, keyed by
what changes the code, checked before use, bounded, cleared. The fast tests stand in for the
compiler and torch's package loader (a compile costs tens of seconds); the slow ones compile."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_corpus, tl, ts

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0, **kw) -> tl.GPT:
    torch.manual_seed(seed)
    cfg = tl.build_config({"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, **kw})
    return tl.GPT(cfg, 40).eval()


@pytest.fixture
def fake_aot(monkeypatch):
    """FrozenStep's compiler and torch's library runner replaced by stand-ins: a "package" is a
    zip holding one "library", FAKE and then `size` bytes; a step loaded from it returns zeros."""
    made = {"compiles": 0, "loads": 0, "size": 1000}

    def compile(self, cache, package, kept):
        made["compiles"] += 1
        with zipfile.ZipFile(package, "w") as z:
            z.writestr("step/data/aotinductor/model/step.wrapper.cpp", "// the code")
            z.writestr("step/data/aotinductor/model/step.wrapper.so", b"FAKE" + bytes(made["size"] - 4))
        return 0.1

    def load(path):
        if not Path(path).read_bytes().startswith(b"FAKE"):
            raise RuntimeError("Failed to load the compiled library: invalid ELF header")
        made["loads"] += 1
        return lambda idx, cache: torch.zeros(idx.size(0), 1, 40)

    monkeypatch.setattr(ts.FrozenStep, "compile", compile)
    monkeypatch.setattr(ts, "load_library", load)
    return made


def prepare(model: tl.GPT, store: tl.StepStore, batch: int = 1):
    """What a fresh launch does: a new FrozenStep for the model, its step for a new cache."""
    return ts.FrozenStep(model, store).prepare(model.new_cache(batch, CPU, torch.float32))


def entries(store: tl.StepStore) -> list[str]:
    return sorted(p.name for p in store.folder.iterdir() if p.suffix in (".so", ".pt2", ".json"))


def test_a_step_is_compiled_once_and_loaded_by_later_launches(fake_aot, tmp_path, capsys):
    store = tl.StepStore(tmp_path / "steps", 10_000)
    model = tiny()
    prepare(model, store)
    assert fake_aot["compiles"] == 1
    err = capsys.readouterr().err
    assert "decode step kept as" in err
    key = ts.step_key(model, model.new_cache(1, CPU, torch.float32))[0]
    assert entries(store) == [f"{key}.json", f"{key}.so"]
    record = json.loads((store.folder / f"{key}.json").read_text())
    assert record["bytes"] == 1000 and record["parts"]["batch"] == 1
    assert record["parts"]["torch"] == torch.__version__
    prepare(model, store)
    prepare(tiny(), store)  # the same weights, built again: the same step
    assert fake_aot["compiles"] == 1
    assert f"loaded from {store.folder / key}.so" in capsys.readouterr().err


def test_the_key_changes_with_what_changes_the_code():
    model = tiny()

    def key(m=model, batch=1, dtype=torch.float32):
        return ts.step_key(m, m.new_cache(batch, CPU, dtype))[0]

    other = tiny()
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1e-3  # one weight
    keys = [key(), key(other), key(batch=2), key(dtype=torch.bfloat16), key(tiny(block_size=32)),
            key(tl.GPT(model.cfg, 40).eval().to(torch.bfloat16)),
            key(tl.QUANTIZERS["int8"](tiny().to(torch.bfloat16)))]
    assert len(set(keys)) == len(keys)
    assert key(tiny()) == keys[0]
    torch.set_num_threads(2)
    try:
        assert key() != keys[0]  # max-autotune timed its kernels on another thread count
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("damage, says", [
    ("flip", "does not match its record's digest (damaged)"),
    ("truncate", "is 500 bytes, not the 1,000 its record says"),
    ("foreign", "was compiled for another model or setup"),
    ("record", "has an unreadable record"),
    ("unloadable", "does not load (Failed to load the compiled library: invalid ELF header)"),
    ("missing", "is 0 bytes, not the 1,000 its record says"),
])
def test_a_damaged_or_foreign_entry_is_compiled_again_not_trusted(fake_aot, tmp_path, capsys, damage, says):
    store = tl.StepStore(tmp_path, 10_000)
    model = tiny()
    prepare(model, store)
    package = next(store.folder.glob("*.so"))
    record = package.with_suffix(".json")
    if damage == "flip":
        package.write_bytes(b"FAKE" + b"\1" + bytes(995))
    elif damage == "truncate":
        package.write_bytes(package.read_bytes()[:500])
    elif damage == "foreign":  # another model's entry under this name
        data = json.loads(record.read_text())
        data["parts"]["weights"] = "0" * 64
        record.write_text(json.dumps(data))
    elif damage == "record":
        record.write_text('{"key": ')
    elif damage == "unloadable":  # a file that matches its record but is no library
        package.write_bytes(b"\x7fELF" + bytes(996))
        data = json.loads(record.read_text())
        data["sha256"] = ts.file_digest(package)
        record.write_text(json.dumps(data))
    elif damage == "missing":
        package.unlink()
    capsys.readouterr()
    prepare(model, store)
    err = capsys.readouterr().err
    assert f"decode step store: {package} {says}" in err and "compiling it again" in err
    assert fake_aot["compiles"] == 2
    prepare(model, store)  # the entry written again is whole
    assert fake_aot["compiles"] == 2


def test_a_record_that_is_not_an_object_is_compiled_again(fake_aot, tmp_path, capsys):
    store = tl.StepStore(tmp_path, 10_000)
    prepare(tiny(), store)
    next(store.folder.glob("*.json")).write_text("[1, 2]")
    prepare(tiny(), store)
    assert "has an unreadable record" in capsys.readouterr().err and fake_aot["compiles"] == 2


def test_a_library_torch_cannot_load_decodes_eagerly_with_one_line(fake_aot, monkeypatch, tmp_path, capsys):
    def refuse(path):
        raise RuntimeError("Failed to dlopen step.so: failed to map segment from shared object\nmore")
    monkeypatch.setattr(ts, "load_library", refuse)
    model = tiny()
    frozen = ts.FrozenStep(model, tl.StepStore(tmp_path, 10_000))
    idx = torch.tensor([[3]])
    with torch.no_grad():
        logits = frozen(idx, model.new_cache(1, CPU, torch.float32))
        eager = model.step(idx, model.new_cache(1, CPU, torch.float32))
    assert torch.equal(logits, eager) and frozen.fell_back
    err = capsys.readouterr().err
    assert "decoding eagerly: the compiled decode step could not be loaded (Failed to dlopen step.so: " \
           "failed to map segment from shared object); --no-compile_decode skips trying" in err


def test_a_damaged_decode_dtype_file_is_measured_again(tmp_path):
    (tmp_path / "decode_dtype.json").write_text('["not", "a", "table"]')
    assert tl.eager_decode_dtype(tiny(), str(tmp_path)) in (torch.float32, torch.bfloat16)
    assert isinstance(json.loads((tmp_path / "decode_dtype.json").read_text()), dict)


def test_the_store_stays_within_its_bound_least_recently_used_first(fake_aot, tmp_path, capsys):
    store = tl.StepStore(tmp_path, 2_500)  # room for two
    models = [tiny(seed) for seed in range(4)]
    keys = [ts.step_key(m, m.new_cache(1, CPU, torch.float32))[0] for m in models]
    for age, model in enumerate(models[:2]):
        prepare(model, store)
        os.utime(store.folder / f"{keys[age]}.json", (time.time() - 100 + age, time.time() - 100 + age))
    prepare(models[0], store)  # used again: now the second is the oldest
    prepare(models[2], store)
    assert entries(store) == sorted(f"{keys[i]}{s}" for i in (0, 2) for s in (".json", ".so"))
    assert "removed 1 least recently used compiled step (0 MB) to stay within --decode_cache_gb" \
        in capsys.readouterr().err
    assert fake_aot["compiles"] == 3


def test_a_step_over_the_bound_is_used_for_this_run_and_not_kept(fake_aot, tmp_path, capsys):
    store = tl.StepStore(tmp_path, 500)
    step = prepare(tiny(), store)
    assert step(torch.zeros(1, 1, dtype=torch.long), None).shape == (1, 1, 40)
    assert "is over --decode_cache_gb 5e-07; it is used by this run only" in capsys.readouterr().err
    assert list(store.folder.iterdir()) == [next(store.folder.glob("*.lock"))]


def test_a_store_that_cannot_be_written_compiles_for_this_run(fake_aot, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    store = tl.StepStore(tmp_path / "file" / "steps", 10_000)  # under a file: mkdir fails
    prepare(tiny(), store)
    assert fake_aot["compiles"] == 1
    err = capsys.readouterr().err
    assert f"decode step store: cannot write to {store.folder} (" in err
    assert "compiled for this run only" in err


def test_clear_decode_cache_removes_every_step_but_one_being_compiled(fake_aot, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    store = tl.StepStore(cache_dir / "decode_steps", 10_000)
    for seed in range(3):
        prepare(tiny(seed), store)
    (store.folder / "0123.partial.so").write_bytes(b"half")
    busy = store.folder / "busy.lock"
    with ts.locked(busy):
        (store.folder / "busy.partial.pt2").write_bytes(b"half")
        assert tl.main(["--clear_decode_cache", "--cache_dir", str(cache_dir)]) == 0
        out = capsys.readouterr().out
    assert f"removed 3 compiled decode steps (0 MB) from {store.folder}; 1 being compiled by another " \
           "process now, left to it" in out
    assert sorted(p.name for p in store.folder.iterdir()) == ["busy.lock", "busy.partial.pt2"]
    assert tl.main(["--clear_decode_cache", "--cache_dir", str(tmp_path / "none")]) == 0
    assert "removed 0 compiled decode steps" in capsys.readouterr().out


def test_decode_cache_gb_zero_keeps_nothing_and_a_negative_one_is_refused(run_args, tmp_path, capsys):
    assert tl.step_store(tl.build_config({"decode_cache_gb": 0})) is None
    assert tl.step_store(tl.build_config({})).limit == 4_000_000_000
    assert tl.main(run_args()) == 0
    assert tl.main(["--generate_only", "--out_dir", str(tmp_path / "out"), "--decode_cache_gb", "-1"]) == 2
    assert "--decode_cache_gb must be 0 (keep nothing) or more" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the real compiler

def launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_tinyllm.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs: subprocess.Popen) -> list[tuple[str, str]]:
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), results
    return results


@pytest.mark.slow
def test_the_default_path_compiles_once_even_for_two_launches_at_once_and_later_ones_load_it(tmp_path):
    """--generate_only as a user runs it, compile_decode on by default: of two launches at once,
    one compiles and keeps the step while the other waits and loads it; a later launch loads
    it; all print the same greedy tokens, the eager path's where the default weights are fp32
    (bf16 where the CPU has it natively, whose near-ties the compiler may round either way)."""
    weights = str(tl.sampling_dtype(tl.build_config({}), torch.device("cpu"), compiled=True))
    weights = weights.removeprefix("torch.")
    make_corpus(tmp_path / "c.txt")
    tiny_cfg = [a for a in TINY if a != "--no-compile_decode"]
    out = ["--out_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    finish(launch("--data_path", str(tmp_path / "c.txt"), *tiny_cfg, *out))
    gen = ["--generate_only", *out, "--temperature", "0", "--max_new_tokens", "12", "--prompt", "the cat"]
    together = finish(launch(*gen), launch(*gen))
    compiled = [err for _, err in together if "compiling the decode step once for this model" in err]
    assert len(compiled) == 1 and f"(batch 1, context 16, {weights} weights" in compiled[0]
    assert "decode step kept as" in compiled[0]
    waited = next(err for _, err in together if err not in compiled)
    assert "loaded from" in waited
    oracle = [launch(*gen, "--no-compile_decode", "--dtype", "float32")] if weights == "float32" else []
    (later_out, later_err), *eager = finish(launch(*gen), *oracle)
    assert "loaded from" in later_err and "compiling" not in later_err
    assert together[0][0] == together[1][0] == later_out
    assert all(out == later_out for out, _ in eager)
    assert len(list((tmp_path / "cache" / "decode_steps").glob("*.so"))) == 1
