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
