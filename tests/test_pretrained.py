"""Starting from a pretrained model (--init_from): GPT-2, Llama and Qwen3 directories made by
transformers itself from random tiny configs (no downloads), and our own checkpoints.

Needs (requirements-dev.txt): transformers, safetensors."""

import json

import pytest
import torch
from conftest import TINY, make_corpus, th, tl

V = 300  # vocabulary of the tiny models; the tokenizer below has exactly this many tokens


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer of V tokens, saved the way a downloaded model has it."""
    corpus = make_corpus(tmp_path_factory.mktemp("tok") / "c.txt").read_text()
    return tl.train_bpe_tokenizer(iter([corpus]), V).to_str()


def hf_config(family: str, **overrides):
    import transformers
    small = {"vocab_size": V, "bos_token_id": 0, "eos_token_id": 0}
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, **small, **overrides)
    common = {"hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, **small}
    if family == "llama":
        return transformers.LlamaConfig(**{"rope_theta": 5000.0, **common, **overrides})
    return transformers.Qwen3Config(**{"head_dim": 16, "tie_word_embeddings": True, **common, **overrides})


def save_hf(family: str, folder, tokenizer_json: str, seed: int = 0, **overrides):
    """A random transformers model saved as a downloaded one is laid out; every weight, bias and
    norm gain random, so that a swapped or transposed tensor shows in the logits."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    return model


def ours(folder, **explicit):
    source = th.load_source(folder)
    cfg = tl.build_config(explicit, base=th.source_defaults(source))
    return th.model_from_source(cfg, source, torch.device("cpu")).eval(), source


FAMILIES = {
    "gpt2": ("gpt2", {}),
    "gpt2-untied": ("gpt2", {"tie_word_embeddings": False}),
    "llama-gqa-untied": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "qwen3": ("qwen3", {}),
}


@pytest.mark.parametrize("case", FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers(case, tokenizer_json, tmp_path):
    family, overrides = FAMILIES[case]
    theirs = save_hf(family, tmp_path / "hf", tokenizer_json, **overrides)
    model, _ = ours(tmp_path / "hf")
    assert (model.lm_head.weight is model.wte.weight) == model.cfg.tie_weights  # tied once more
    idx = torch.randint(V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4
    prompt = idx[:1, :5]
    expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = tl.generate(model, prompt, tl.SampleSettings(max_new_tokens=12, temperature=0.0))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-untied", "qwen3"])
def test_import_export_import_is_lossless(case, tokenizer_json, tmp_path):
    family, overrides = FAMILIES[case]
    save_hf(family, tmp_path / "hf", tokenizer_json, **overrides)
    model, source = ours(tmp_path / "hf")
    tok = tl.TextTokenizer.from_str(source.tokenizer)
    th.export_hf(model, tok, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == family
    again, source_again = ours(tmp_path / "again")
    assert source_again.config == source.config and source_again.context == 64
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_learned_positions_are_cropped_and_never_extended(tokenizer_json, tmp_path):
    theirs = save_hf("gpt2", tmp_path / "hf", tokenizer_json)
    model, _ = ours(tmp_path / "hf", block_size=16)
    assert model.positions.wpe.weight.shape == (16, 32)
    idx = torch.randint(V, (1, 16))
    with torch.no_grad():
        assert (model(idx)[0] - theirs(idx).logits).abs().max() < 1e-4
    source = th.load_source(tmp_path / "hf")
    cfg = tl.build_config({"block_size": 65}, base=th.source_defaults(source))
    with pytest.raises(tl.TinyLLMError, match="longer than the 64 positions"):
        th.check_source_compatible(cfg, {"block_size": 65}, source)


REFUSED = {
    "rope_scaling": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_"),
    "bias on attention only": ("llama", {"attention_bias": True}, "attention_bias = True"),
    "sliding windows": ("qwen3", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    "activation": ("gpt2", {"activation_function": "relu"}, "activation_function = 'relu'"),
    "layer-scaled attention": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_we_cannot_compute_is_refused_naming_the_field(case, tokenizer_json, tmp_path):
    family, overrides, field = REFUSED[case]
    save_hf(family, tmp_path / "hf", tokenizer_json, **overrides)
    with pytest.raises(tl.TinyLLMError, match=field):
        th.load_source(tmp_path / "hf")


def test_another_model_type_and_broken_directories_are_refused(tokenizer_json, tmp_path):
    save_hf("llama", tmp_path / "hf", tokenizer_json)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    with pytest.raises(tl.TinyLLMError, match="model_type = 'mixtral'"):
        th.load_source(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a cut-off download
    with pytest.raises(tl.TinyLLMError, match="cannot be read as safetensors"):
        th.load_source(tmp_path / "hf")
    weights.unlink()
    with pytest.raises(tl.TinyLLMError, match="no model.safetensors"):
        th.load_source(tmp_path / "hf")
    with pytest.raises(tl.TinyLLMError, match="neither a tinyllm checkpoint"):
        th.load_source(tmp_path)


def test_sharded_safetensors_and_pytorch_bin_load_alike(tokenizer_json, tmp_path):
    theirs = save_hf("llama", tmp_path / "one", tokenizer_json)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "bin").mkdir()  # transformers 5 writes safetensors only: an older download's file
    torch.save(theirs.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    for name in ("sharded", "bin"):
        (tmp_path / name / "tokenizer.json").write_text(tokenizer_json)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    reference = ours(tmp_path / "one")[0].state_dict()
    for name in ("sharded", "bin"):
        state = ours(tmp_path / name)[0].state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_a_pickle_that_runs_code_is_refused(tokenizer_json, tmp_path):
    save_hf("llama", tmp_path / "hf", tokenizer_json)
    (tmp_path / "hf" / "model.safetensors").unlink()
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(tl.TinyLLMError, match="holds Python code, which we never run"):
        th.load_source(tmp_path / "hf")


def test_cli_fine_tunes_from_hf_with_the_source_loss_first(tokenizer_json, tmp_path, capsys):
    """The val loss logged before the first step is the source model's loss on those val tokens;
    the run then trains, and its export is the source's family again."""
    theirs = save_hf("qwen3", tmp_path / "hf", tokenizer_json)
    data = make_corpus(tmp_path / "corpus.txt")
    args = ["--data_path", str(data), "--out_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *TINY, "--init_from", str(tmp_path / "hf"),
            "--eval_iters", "3", "--dtype", "float32"]
    assert tl.main(args) == 0  # TINY's --n_layer 2 --n_head 4 --n_embd 32 agree with the source
    out = capsys.readouterr().out
    assert "from " + str(tmp_path / "hf") in out
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "val_loss" in r)
    assert first["step"] == 0
    # the same val batches the run drew, through transformers
    cfg = tl.build_config({"block_size": 16, "batch_size": 4, "eval_iters": 3},
                          base=th.source_defaults(th.load_source(tmp_path / "hf")))
    splits = tl.prepare_data(cfg, tl.load_corpus(tl.Config(data_path=str(data))),
                             tl.TextTokenizer.from_str(tokenizer_json))
    expected = tl.estimate_loss(theirs_as_ours(theirs), {"val": splits["val"]}, cfg, torch.device("cpu"),
                                torch.float32)["val"]
    assert first["val_loss"] == pytest.approx(expected, abs=1e-5)
    assert records[-1]["step"] == 6
    assert tl.main(["--export", "hf", "--out_dir", str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "export-hf" / "config.json").read_text())
    assert exported["model_type"] == "qwen3" and exported["head_dim"] == 16


def theirs_as_ours(hf_model):
    """A transformers model behind our forward's signature, for estimate_loss."""
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = hf_model

        def forward(self, idx, targets=None, **_):
            logits = self.inner(idx).logits
            return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return Wrapped()


def test_cli_refuses_flags_that_contradict_the_source(tokenizer_json, tmp_path, capsys, run_args):
    save_hf("llama", tmp_path / "hf", tokenizer_json)
    capsys.readouterr()  # transformers' own progress bar
    for extra, message in ((["--n_layer", "3"], "--n_layer 3 contradicts"),
                           (["--tokenizer", "char"], "brings its own tokenizer"),
                           (["--arch", "gpt2"], "drop --arch"),
                           (["--benchmark"], "--benchmark does not take it"),
                           (["--generate_only"], "no checkpoint at")):  # --init_from only moves a LoRA base
        assert tl.main(run_args(*extra, "--init_from", str(tmp_path / "hf"))) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_init_from_our_own_checkpoint_starts_fresh(run_args, tmp_path, capsys):
    assert tl.main(run_args(out="first")) == 0
    capsys.readouterr()

    def evals(out):
        records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "val_loss" in r]
    assert tl.main(run_args("--init_from", str(tmp_path / "first" / "ckpt.pt"), "--learning_rate", "1e-3",
                            out="second")) == 0
    first, second = evals("first"), evals("second")
    assert second[0]["step"] == 0 and second[0]["val_loss"] == pytest.approx(first[-1]["val_loss"], abs=1e-6)
    second = torch.load(tmp_path / "second" / "ckpt.pt", weights_only=True)
    assert second["step"] == 6 and second["config"]["init_from"].endswith("ckpt.pt")


def broken(kind, folder):
    """Damage a saved model directory the way downloads go wrong."""
    if kind == "truncated config.json":
        (folder / "config.json").write_text((folder / "config.json").read_text()[:40])
    elif kind == "config without a field":
        config = json.loads((folder / "config.json").read_text())
        del config["intermediate_size"]
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "git-lfs pointer":
        pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"
        (folder / "model.safetensors").write_text(pointer)
    elif kind == "unreadable tokenizer.json":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    elif kind == "tokenizer larger than the model":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    elif kind == "a shard missing":
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    elif kind == "fp8 weights":
        from safetensors.torch import save_file
        save_file({"model.embed_tokens.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)},
                  str(folder / "model.safetensors"))
    elif kind == "tokenizer.model only":
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.model").write_bytes(b"\x00")


BROKEN = {"truncated config.json": "cannot be read as JSON", "config without a field": "'intermediate_size'",
          "git-lfs pointer": "Git LFS pointer", "unreadable tokenizer.json": "cannot be read as a tokenizer",
          "tokenizer larger than the model": "only 200 rows", "a shard missing": "is missing",
          "fp8 weights": "F8_E4M3", "tokenizer.model only": "AutoTokenizer.from_pretrained"}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_downloads_are_refused_in_one_line(kind, tokenizer_json, tmp_path, run_args, capsys):
    save_hf("llama", tmp_path / "hf", tokenizer_json)
    broken(kind, tmp_path / "hf")
    capsys.readouterr()
    assert tl.main(run_args("--init_from", str(tmp_path / "hf"))) == 2
    err = capsys.readouterr().err.strip()
    assert BROKEN[kind] in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_legacy_pytorch_bin_loads(tokenizer_json, tmp_path):
    theirs = save_hf("llama", tmp_path / "hf", tokenizer_json)
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(theirs.state_dict(), tmp_path / "hf" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)  # as files from before torch 1.6 are
    model, _ = ours(tmp_path / "hf")
    idx = torch.randint(V, (1, 8))
    with torch.no_grad():
        assert (model(idx)[0] - theirs(idx).logits).abs().max() < 1e-4


def test_a_vocabulary_larger_than_the_tokenizer_trains_and_resumes(tokenizer_json, tmp_path, run_args,
                                                                    capsys):
    """Qwen3 pads its embedding past its tokenizer (151,936 rows for 151,669 tokens)."""
    save_hf("llama", tmp_path / "hf", tokenizer_json, vocab_size=V + 20)
    assert tl.main(run_args("--init_from", str(tmp_path / "hf"), "--stop_at_step", "3")) == 0
    assert tl.main(run_args("--init_from", str(tmp_path / "hf"), "--resume")) == 0
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["vocab_size"] == V + 20
    capsys.readouterr()
    assert tl.main(run_args("--init_from", str(tmp_path / "hf"), "--tokenizer", "bpe", out="other")) == 2
    assert "brings its own tokenizer" in capsys.readouterr().err


def rewrite_header(path, edit):
    """A .safetensors file with its JSON header changed by `edit` (the data left as it is)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


HEADERS = {
    "negative shape": lambda h: h[first_tensor(h)].update(shape=[-1]),
    "span shorter than the shape": lambda h: h[first_tensor(h)].update(
        data_offsets=[h[first_tensor(h)]["data_offsets"][0], h[first_tensor(h)]["data_offsets"][0] + 4]),
    "overlapping tensors": lambda h: [v.update(data_offsets=[0, v["data_offsets"][1] - v["data_offsets"][0]])
                                      for k, v in h.items() if k != "__metadata__"],
    "integer weights": lambda h: h["model.norm.weight"].update(
        dtype="I32", shape=[h["model.norm.weight"]["shape"][0] // 2]),
}


@pytest.mark.parametrize("case", HEADERS)
def test_malformed_safetensors_headers_are_refused(case, tokenizer_json, tmp_path, run_args, capsys):
    save_hf("llama", tmp_path / "hf", tokenizer_json)
    rewrite_header(tmp_path / "hf" / "model.safetensors", HEADERS[case])
    capsys.readouterr()
    assert tl.main(run_args("--init_from", str(tmp_path / "hf"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("safetensors" in err or "does not fit" in err)
    assert not (tmp_path / "out").exists()


def test_shards_are_read_as_their_index_maps_them(tokenizer_json, tmp_path, run_args, capsys):
    theirs = save_hf("llama", tmp_path / "one", tokenizer_json)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "sharded" / "tokenizer.json").write_text(tokenizer_json)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    mapping = json.loads(index.read_text())
    name, shard = next(iter(mapping["weight_map"].items()))
    other = next(s for s in set(mapping["weight_map"].values()) if s != shard)
    index.write_text(json.dumps({**mapping, "weight_map": {**mapping["weight_map"], name: other}}))
    with pytest.raises(tl.TinyLLMError, match=f"lacks {name}, which the index puts there"):
        th.load_source(tmp_path / "sharded")
    index.write_text(json.dumps({**mapping, "weight_map": {**mapping["weight_map"], name: "../one/x"}}))
    with pytest.raises(tl.TinyLLMError, match="outside the model directory"):
        th.load_source(tmp_path / "sharded")


def test_a_wrong_shape_is_refused_before_the_run_directory_is_touched(tokenizer_json, tmp_path, run_args,
                                                                      capsys):
    assert tl.main(run_args()) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    save_hf("llama", tmp_path / "hf", tokenizer_json)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    capsys.readouterr()
    assert tl.main(run_args("--init_from", str(tmp_path / "hf"), "--overwrite")) == 2
    assert "fill 72 of the 80 rows of blocks.0.mlp.gate.weight" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before


def test_a_longer_rope_context_is_allowed_with_a_note(tokenizer_json, tmp_path, run_args, capsys):
    save_hf("llama", tmp_path / "hf", tokenizer_json)  # max_position_embeddings 64
    tl.resolve(run_args("--init_from", str(tmp_path / "hf"), "--block_size", "128"))
    assert "longer than the 64 tokens" in capsys.readouterr().out


def test_streamed_samples_keep_the_spaces_of_sentencepiece_tokenizers(capsys):
    """Llama 2 / TinyLlama style: a Metaspace decoder drops the space at the start of a text, so
    tokens decoded one at a time would run the words together."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(["hear me speak, first citizen, before we proceed any further"] * 50,
                           trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>"]))
    tok = tl.TextTokenizer(hf)
    assert tok.eot == "</s>" and tok.kind == "other"
    prompt, rest = tok.encode("First citizen:"), tok.encode(" hear me speak, before we proceed")
    streamer = tl.TextStreamer(tok, prompt)
    for t in rest:
        streamer(torch.tensor([[t]]))
    assert capsys.readouterr().out == tok.decode(prompt + rest)[len(tok.decode(prompt)):]
    assert "hear me speak" in tok.decode(prompt + rest)


def test_an_imported_word_level_tokenizer_is_not_char_level():
    from tokenizers import Tokenizer, models, pre_tokenizers
    hf = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tl.TextTokenizer(hf).kind == "other" and tl.train_char_tokenizer("abc").kind == "char"
    assert tl.TextTokenizer(hf).unknown_chars("zebra") == []  # its [UNK] takes what it lacks
