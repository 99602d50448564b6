"""Extension points: every config choice is a registry key with a working entry, and an entry
added to a registry is a new value of its flag."""

import itertools

import pytest
import torch
from conftest import make_corpus, tl

# config field -> (its registry, values it allows besides the registry's keys)
REGISTRY_FIELDS = {
    "arch": (tl.PRESETS, ()),
    "tokenizer": (tl.TOKENIZERS, ()),
    "norm": (tl.NORMS, ()),
    "mlp": (tl.MLPS, ()),
    "pos_encoding": (tl.POSITIONS, ()),
    "lr_schedule": (tl.SCHEDULES, ()),
    "optimizer": (tl.OPTIMIZERS, ()),
    "export": (tl.EXPORTERS, ("none",)),
    "quantize": (tl.QUANTIZERS, ()),
    "task_format": (tl.TASK_FORMATS, ("auto",)),
    "objective": (tl.OBJECTIVES, ()),
}


def test_every_choice_has_an_entry_and_every_entry_a_choice():
    for name, (registry, extra) in REGISTRY_FIELDS.items():
        assert registry, f"{name}: empty registry"
        assert set(tl.choices_of(name)) == set(registry) | set(extra), name
        assert tl.FIELDS[name].default in tl.choices_of(name), name
    # no other field takes its choices from a registry we did not list
    for name, f in tl.FIELDS.items():
        spec = f.metadata["choices"]
        parts = [spec] if isinstance(spec, dict) else (spec or ())
        assert all(p is REGISTRY_FIELDS[name][0] for p in parts if isinstance(p, dict)), name


def test_presets_set_only_model_fields():
    for arch, fields in tl.PRESETS.items():
        assert set(fields) <= set(tl.ARCH_KEYS), arch
        assert tl.build_config({"arch": arch}).arch == arch


@pytest.mark.parametrize("kind", list(tl.TOKENIZERS))
def test_every_tokenizer_entry_trains_and_round_trips(kind):
    text = "the cat sat on the mat\n" * 50
    tok = tl.TOKENIZERS[kind](iter([text]), tl.Config(bpe_vocab_size=300))
    assert tok.decode(tok.encode("the mat sat")) == "the mat sat" and tok.eot_id is not None


def test_every_model_part_combination_builds_and_runs():
    for norm, mlp, pos in itertools.product(tl.NORMS, tl.MLPS, tl.POSITIONS):
        cfg = tl.build_config({"norm": norm, "mlp": mlp, "pos_encoding": pos, "n_layer": 1,
                               "n_embd": 16, "n_head": 2, "block_size": 8})
        model = tl.GPT(cfg, 11)
        logits, loss = model(torch.randint(11, (2, 8)), torch.randint(11, (2, 8)))
        assert logits.shape == (2, 8, 11) and torch.isfinite(loss), (norm, mlp, pos)


@pytest.mark.parametrize("schedule", list(tl.SCHEDULES))
def test_every_schedule_stays_between_min_lr_and_peak(schedule):
    cfg = tl.Config(lr_schedule=schedule, max_steps=40, warmup_steps=5)
    lrs = [tl.lr_at(step, cfg) for step in range(40)]
    assert all(cfg.min_lr - 1e-12 <= lr <= cfg.learning_rate + 1e-12 for lr in lrs)
    assert lrs[5] == pytest.approx(cfg.learning_rate)  # the schedule starts at the peak


@pytest.mark.parametrize("name", list(tl.OPTIMIZERS))
def test_every_optimizer_entry_covers_each_parameter_once(name):
    model = tl.GPT(tl.Config(n_layer=1, n_embd=32, optimizer=name), 20)
    opts = tl.make_optimizers(model, model.cfg, torch.device("cpu"))
    owned = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_every_exporter_names_its_file():
    for fmt, exporter in tl.EXPORTERS.items():
        assert callable(exporter.write) and isinstance(exporter.filename, str), fmt
    assert tl.EXPORTERS["hf"].filename == ""  # the directory is the export


def test_a_new_entry_is_a_new_flag_value(monkeypatch, tmp_path):
    """Registering a norm makes --norm accept it (flags and JSON) and the model use it."""
    with pytest.raises(tl.TinyLLMError, match="invalid choice"):
        tl.parse_args(["--norm", "unitnorm"])
    monkeypatch.setitem(tl.NORMS, "unitnorm", lambda dim, cfg: torch.nn.Identity())
    cfg = tl.build_config(tl.parse_args(["--norm", "unitnorm", "--n_layer", "1"]))
    assert isinstance(tl.GPT(cfg, 10).norm_f, torch.nn.Identity)
    path = tmp_path / "c.json"
    path.write_text('{"norm": "unitnorm"}')
    assert tl.load_json_config(str(path)) == {"norm": "unitnorm"}


def test_a_new_reader_serves_directories_and_globs(monkeypatch, tmp_path):
    """A reader registered for a file ending is picked up by directory listings and used to
    read those files: here one that reverses each line."""
    def reversed_lines(path, settings):
        yield "\n".join(line[::-1] for line in path.read_text().splitlines())

    monkeypatch.setitem(tl.READERS, "reversed", tl.Reader((".rev",), reversed_lines))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.rev").write_text("tac eht\n")
    make_corpus(folder / "b.txt", n_lines=3)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    files = tl.resolve_data_path(str(folder))
    assert [f.name for f in files] == ["a.rev", "b.txt"]
    corpus = tl.load_corpus(tl.Config(data_path=str(folder / "*.rev")))
    assert "".join(text for _, blocks in corpus.sources() for text in blocks) == "the cat"
    assert tl.read_text_file(str(folder / "a.rev"), tl.ReadSettings("--eval_data")) == "the cat"


def test_directory_listing_by_suffix(monkeypatch, tmp_path):
    """A dotfile that is only a suffix is no match, and the refusal names the known suffixes."""
    (tmp_path / ".txt").write_text("not a corpus")
    with pytest.raises(tl.TinyLLMError, match="is a directory with no .txt, .md, .jsonl or .parquet files"):
        tl.resolve_data_path(str(tmp_path))
    monkeypatch.setattr(tl, "READERS", {"text": tl.Reader((".txt",), tl.read_blocks)})
    with pytest.raises(tl.TinyLLMError, match="is a directory with no .txt files "):
        tl.resolve_data_path(str(tmp_path))
