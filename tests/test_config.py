import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tl

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_tinyllm.py")


def write_json(path: Path, data: object) -> str:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_precedence_defaults_preset_file_flags(tmp_path):
    cfg_path = write_json(tmp_path / "c.json", {"arch": "gpt2", "n_layer": 3, "norm": "rmsnorm",
                                                 "learning_rate": 0.01})
    cfg = tl.build_config(tl.parse_args(["--config", cfg_path, "--n_layer", "5"]))
    assert cfg.n_layer == 5                      # flag beats file
    assert cfg.learning_rate == 0.01             # file beats default
    assert cfg.norm == "rmsnorm"                 # explicit file value beats the gpt2 preset
    assert cfg.mlp == "gelu" and cfg.pos_encoding == "learned" and cfg.bias  # preset beats defaults
    assert cfg.n_head == tl.Config().n_head      # untouched default


def test_presets_are_data():
    gpt2 = tl.build_config({"arch": "gpt2"})
    llama = tl.build_config({"arch": "llama"})
    assert (gpt2.norm, gpt2.mlp, gpt2.pos_encoding, gpt2.bias, gpt2.tie_weights) == \
        ("layernorm", "gelu", "learned", True, True)
    assert (llama.norm, llama.mlp, llama.pos_encoding, llama.bias) == ("rmsnorm", "swiglu", "rope", False)
    assert tl.build_config({"arch": "gpt2", "pos_encoding": "rope"}).pos_encoding == "rope"


@pytest.mark.parametrize("content, needle", [
    ({"n_layers": 4}, "unknown key 'n_layers'; did you mean 'n_layer'?"),
    ({"n_layer": "4"}, "key 'n_layer' must be int"),
    ({"bias": 1}, "key 'bias' must be bool"),
    ({"norm": "batchnorm"}, "key 'norm' must be one of layernorm, rmsnorm"),
    ('{"n_layer": 4,}', "invalid JSON at line 1"),
    ([1, 2], "top level must be a JSON object"),
    ({"n_embd": 30, "n_head": 4}, "--n_embd 30 is not divisible by --n_head 4"),
    ({"n_head": 6, "n_kv_head": 4, "n_embd": 48}, "--n_head 6 is not divisible by --n_kv_head 4"),
    ({"n_embd": 36, "n_head": 4, "pos_encoding": "rope"}, "rope needs an even head size"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1)"),
    ({"learning_rate": 0}, "--learning_rate must be positive"),
    ({"top_p": 0}, "--top_p must be in (0, 1]"),
])
def test_bad_config_refused_with_one_line(tmp_path, capsys, content, needle):
    path = write_json(tmp_path / "bad.json", content)
    out_dir = tmp_path / "out"
    assert tl.main(["--config", path, "--out_dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out_dir.exists()  # refused before any work


def test_int_accepted_for_float(tmp_path):
    cfg = tl.build_config(tl.load_json_config(write_json(tmp_path / "c.json", {"learning_rate": 1})))
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


@pytest.mark.slow
def test_help_groups_and_defaults():
    text = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          check=True).stdout
    for group in tl.GROUPS:
        assert f"\n{group}:\n" in text
    assert "--kv_cache, --no-kv_cache" in text and "(default: 'auto')" in text


def test_every_field_has_a_flag_and_help():
    parser = tl.build_parser()
    flags = {a.dest for a in parser._actions}
    for name, f in tl.FIELDS.items():
        assert name in flags and f.metadata["help"] and f.metadata["group"] in tl.GROUPS


def test_shipped_configs_are_valid():
    configs = sorted((Path(SCRIPT).parent / "config").glob("*.json"))
    assert len(configs) >= 4
    for path in configs:
        tl.build_config(tl.load_json_config(str(path)))


def test_device_auto_picks_cpu_without_gpu():
    assert tl.pick_device("auto").type in ("cuda", "mps", "cpu")
    assert tl.pick_device("cpu").type == "cpu"
    with pytest.raises(tl.TinyLLMError, match="not a device"):
        tl.build_config({"device": "tpu"})


def test_config_is_resolved_once_per_invocation(run_args, tmp_path, monkeypatch, capsys):
    """Whatever the mode, each group of checks runs once and the checkpoint is read once."""
    assert tl.main(run_args()) == 0
    real_load, real_validate = tl.load_checkpoint, tl.validate
    seen: dict[str, list] = {"loads": [], "checks": []}

    def load(path, mmap=False, shards=True):
        seen["loads"].append(path)
        return real_load(path, mmap, shards)

    def validate(cfg, groups=(tl.run_checks, *tl.SETTING_CHECKS)):
        seen["checks"] += [g.__name__ for g in groups]
        return real_validate(cfg, groups)
    monkeypatch.setattr(tl, "load_checkpoint", load)
    monkeypatch.setattr(tl, "validate", validate)
    every_group = sorted(g.__name__ for g in (tl.run_checks, *tl.SETTING_CHECKS))
    out = ["--out_dir", str(tmp_path / "out")]
    for argv, loads in ((["--generate_only", "--max_new_tokens", "4"], 1), (["--eval_only"], 1),
                        (["--export", "safetensors"], 1), (["--resume", "--max_steps", "7"], 1),
                        (["--plot"], 0), (run_args("--benchmark", out="bench"), 0)):
        seen["loads"].clear(), seen["checks"].clear()
        assert tl.main([*out, *argv]) == 0, argv
        assert len(seen["loads"]) == loads and sorted(seen["checks"]) == every_group, argv


def test_resume_validates_the_merged_config(run_args):
    """--min_lr above the default learning rate is fine when the checkpoint's is higher still."""
    assert tl.main(run_args("--learning_rate", "0.02", "--min_lr", "0.001")) == 0
    assert tl.main(run_args("--resume", "--max_steps", "7", "--min_lr", "0.01")) == 0
    assert tl.main(run_args("--resume", "--max_steps", "8", "--min_lr", "0.03")) == 2


def test_every_mode_has_an_entry():
    modes = {"--generate_only": "generate", "--chat": "chat", "--serve": "serve", "--eval_only": "eval",
             "--benchmark": "benchmark", "--plot": "plot", "--export=hf": "export",
             "--clear_decode_cache": "clear_decode_cache"}
    for flag, mode in modes.items():
        assert tl.modes_asked(tl.merge_config(tl.parse_args([flag]))) == [mode]
    assert set(tl.MODES) == {"train", *modes.values()}


def test_the_core_never_calls_the_tools():
    """Nothing above the ruler (the core) names anything defined below it (the tools)."""
    import ast
    source = Path(SCRIPT).read_text()
    ruler = source.index("\n# =====")
    core, tools = ast.parse(source[:ruler]), ast.parse(source[ruler:])
    tool_names = {n.name if hasattr(n, "name") else ast.unparse(n.targets[0])
                  for n in tools.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))}
    annotations = [a for n in ast.walk(core) for a in (getattr(n, "annotation", None),
                                                      getattr(n, "returns", None)) if a]
    in_annotations = {id(n) for a in annotations for n in ast.walk(a)}
    used = {n.id for n in ast.walk(core)  # names read as values: calls, references, not field names
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in in_annotations}
    assert tool_names and "train" not in tool_names and not used & tool_names, used & tool_names


def test_min_lr_follows_the_learning_rate_unless_set():
    assert tl.merge_config({"learning_rate": 1e-4}).min_lr == pytest.approx(1e-5)
    assert tl.merge_config({}).min_lr == tl.Config().min_lr == tl.Config().learning_rate / 10
    assert tl.merge_config({"learning_rate": 1e-4, "min_lr": 0.0}).min_lr == 0.0
    assert tl.merge_config({"learning_rate": 1e-4}, base={"min_lr": 3e-5}).min_lr == 3e-5  # a resume's
