"""Fast decoding: the static KV cache, the compiled decode step, int8 weights, batched samples."""

import copy
import functools

import pytest
import torch
from conftest import tl, ts

VOCAB = 61


def tiny(norm="rmsnorm", mlp="swiglu", pos="rope", qk=False, window=0, parallel=False, kv=0) -> tl.GPT:
    cfg = tl.Config(n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, block_size=16, norm=norm, mlp=mlp,
                    pos_encoding=pos, qk_norm=qk, sliding_window=window, parallel_block=parallel)
    tl.validate(cfg)
    torch.manual_seed(0)
    return tl.GPT(cfg, VOCAB).eval()


@pytest.mark.parametrize("shape", [(32, 96), (64, 61), (33, 7), (40, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_float_layer_within_rounding(shape, dtype):
    """Both the packed CPU kernel (width a multiple of 16) and the widened fallback: within the
    error of rounding each weight to 1/254 of its row's range."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(*shape, bias=True).to(dtype)
    q = ts.Int8Linear(linear, dtype)
    assert q.weight.dtype == torch.int8 and q.packed_kernel == (shape[0] % 16 == 0 and shape[1] >= 16)
    x = torch.randn(3, 5, shape[0], dtype=dtype)
    with torch.no_grad():
        want, got = linear(x).float(), q(x).float()
    assert got.shape == want.shape
    assert (got - want).norm() / want.norm() < 0.02


def test_int8_sampling_copy_leaves_the_model_alone_and_keeps_the_embedding():
    model = tiny()
    model.lm_head.weight = model.wte.weight  # tied
    before = copy.deepcopy(model.state_dict())
    cfg = tl.Config(n_layer=2, n_head=4, n_embd=32, block_size=16, dtype="float32", quantize="int8")
    q = tl.sampling_copy(model, cfg, torch.device("cpu"))
    assert q is not model and isinstance(q.lm_head, ts.Int8Linear)
    assert isinstance(q.blocks[0].attn.qkv, ts.Int8Linear)
    assert isinstance(q.blocks[1].mlp.out_proj, ts.Int8Linear)
    assert torch.equal(q.wte.weight, model.wte.weight) and q.wte.weight.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_batched_rows_decode_as_they_would_alone(quantize):
    """Rows of a batch never mix: each row's greedy tokens are those of the row decoded alone."""
    model = tl.QUANTIZERS[quantize](tiny(kv=2))
    prompts = torch.randint(VOCAB, (3, 4), generator=torch.Generator().manual_seed(1))
    greedy = tl.SampleSettings(max_new_tokens=10, temperature=0)
    together = tl.generate(model, prompts, greedy)
    for row in range(3):
        assert torch.equal(together[row:row + 1], tl.generate(model, prompts[row:row + 1], greedy))


def test_int8_weights_keep_cache_and_no_cache_greedy_equal():
    model = tl.QUANTIZERS["int8"](tiny(window=5, kv=2))
    idx = torch.randint(VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    greedy = tl.SampleSettings(max_new_tokens=12, temperature=0)
    cached = tl.generate(model, idx, greedy)
    greedy.kv_cache = False
    assert torch.equal(cached, tl.generate(model, idx, greedy))


COMPILED_SWITCHES = [("rmsnorm", "swiglu", "rope", True, 5, True, 2),
                     ("layernorm", "gelu", "learned", False, 0, False, 0)]


@pytest.fixture
def through_torch_compile(monkeypatch):
    """generate() decoding through torch.compile's step, as on GPUs (on CPU it is AOTInductor's)."""
    monkeypatch.setattr(tl, "decode_step", lambda model, compiled, store=None:
                        functools.partial(tl.compiled_step(), model) if compiled else model.step)


@pytest.mark.slow
@pytest.mark.parametrize("switches", COMPILED_SWITCHES, ids=lambda s: "-".join(map(str, s)))
def test_compiled_decode_step_is_the_eager_one_and_compiles_once(switches, through_torch_compile):
    """The step through torch.compile (GPUs' path): in fp32 it picks the greedy tokens of the
    uncached oracle while the prompt and output fit in block_size, and those of the eager cached
    path past it (where the cache restarts); the position advancing 40 times, through two
    restarts, makes no new graph."""
    torch._dynamo.reset()
    model = tiny(*switches)
    idx = torch.randint(VOCAB, (2, 3), generator=torch.Generator().manual_seed(3))
    before = tl.compile_count()
    fits = tl.SampleSettings(max_new_tokens=13, temperature=0, compiled=True)
    oracle = tl.generate(model, idx, tl.SampleSettings(max_new_tokens=13, temperature=0, kv_cache=False))
    assert torch.equal(tl.generate(model, idx, fits), oracle)
    long = tl.SampleSettings(max_new_tokens=40, temperature=0, compiled=True)
    eager = tl.generate(model, idx, tl.SampleSettings(max_new_tokens=40, temperature=0))
    assert torch.equal(tl.generate(model, idx, long), eager)
    assert tl.compile_count() - before == 1


@pytest.mark.slow
def test_compiled_int8_decode_matches_eager_int8(through_torch_compile):
    torch._dynamo.reset()
    model = tl.QUANTIZERS["int8"](tiny().to(torch.bfloat16))
    idx = torch.randint(VOCAB, (1, 3), generator=torch.Generator().manual_seed(4))
    eager = tl.generate(model, idx, tl.SampleSettings(max_new_tokens=20, temperature=0))
    with torch.no_grad():
        logits_eager = model.step(idx[:, -1:], model.new_cache(1, idx.device, torch.float32))
        compiled = tl.compiled_step()(model, idx[:, -1:], model.new_cache(1, idx.device, torch.float32))
    assert torch.allclose(compiled, logits_eager, atol=2e-2)
    assert torch.equal(tl.generate(model, idx, tl.SampleSettings(max_new_tokens=20, temperature=0,
                                                                 compiled=True)), eager)


@pytest.mark.slow
@pytest.mark.parametrize("switches", COMPILED_SWITCHES[:1], ids=lambda s: "-".join(map(str, s)))
def test_frozen_decode_step_is_the_eager_one_and_compiles_once_per_batch_size(switches):
    """The step compiled ahead of time with the weights built in: in fp32 the oracle's greedy
    tokens within block_size and the eager cached path's past it, through two cache restarts;
    one library per batch size, whatever the position."""
    model = tiny(*switches)
    idx = torch.randint(VOCAB, (2, 3), generator=torch.Generator().manual_seed(3))
    before = tl.compile_count()
    fits = tl.SampleSettings(max_new_tokens=13, temperature=0, compiled=True)
    oracle = tl.generate(model, idx, tl.SampleSettings(max_new_tokens=13, temperature=0, kv_cache=False))
    assert torch.equal(tl.generate(model, idx, fits), oracle)
    long = tl.SampleSettings(max_new_tokens=40, temperature=0, compiled=True)
    eager = tl.generate(model, idx, tl.SampleSettings(max_new_tokens=40, temperature=0))
    assert torch.equal(tl.generate(model, idx, long), eager)
    assert tl.compile_count() - before == 1
    assert isinstance(tl.decode_step(model, True), ts.FrozenStep)


@pytest.mark.slow
def test_decoding_reads_the_slots_written_so_far_and_no_further():
    """Attention in the compiled step and in eager decoding on CPU reads the slots up to the
    furthest row's position, not the whole cache: NaN past there changes nothing (reading them,
    a hidden slot's weight 0 times NaN would be NaN), and rows of one batch at other positions
    still get the logits of a cache that holds zeros there."""
    model = tiny()
    prefix = torch.randint(VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    clean = model.new_cache(2, prefix.device, torch.float32)
    with torch.no_grad():
        model(prefix, cache=clean)
    clean.pos_t.copy_(torch.tensor([3, 5]))  # row 0 goes back: each row at its own place

    def dirty() -> tl.KVCache:
        cache = copy.copy(clean)
        cache.k, cache.v = [k.clone() for k in clean.k], [v.clone() for v in clean.v]
        cache.pos_t = clean.pos_t.clone()
        for t in cache.k + cache.v:
            t[:, :, 6:] = float("nan")
        return cache

    idx = torch.tensor([[5], [7]])
    with torch.no_grad():
        expected = model.step(idx, clean)
        for logits in (model.step(idx, dirty()), tl.decode_step(model, True)(idx, dirty())):
            assert torch.isfinite(logits).all()
            assert torch.allclose(logits, expected, atol=1e-5)


@pytest.mark.slow
def test_frozen_int8_step_matches_eager_int8_and_the_weights_stay_out_of_shared_graphs():
    model = tl.QUANTIZERS["int8"](tiny().to(torch.bfloat16))
    idx = torch.randint(VOCAB, (1, 3), generator=torch.Generator().manual_seed(4))
    eager = tl.generate(model, idx, tl.SampleSettings(max_new_tokens=20, temperature=0))
    step = tl.decode_step(model, True)
    assert step is tl.decode_step(model, True)  # one per model: its libraries are kept
    with torch.no_grad():
        logits_eager = model.step(idx[:, -1:], model.new_cache(1, idx.device, torch.float32))
        frozen = step(idx[:, -1:], model.new_cache(1, idx.device, torch.float32))
    assert torch.allclose(frozen, logits_eager, atol=2e-2)
    assert torch.equal(tl.generate(model, idx, tl.SampleSettings(max_new_tokens=20, temperature=0,
                                                                 compiled=True)), eager)
    # training's samples (weights that change) decode eagerly: no library of their own
    cfg = tl.build_config({"device": "cpu"})
    assert not tl.decode_compiles(cfg, torch.device("cpu"), frozen=False)
    assert tl.decode_step(model, False) == model.step


@pytest.mark.slow
def test_frozen_steps_of_models_of_one_shape_each_hold_their_own_weights():
    """Two models of the same shapes compile the same code: each library must still compute with
    its own model's weights, not the other's."""
    models = [tiny(), tiny()]
    with torch.no_grad():
        models[1].lm_head.weight.mul_(-1)  # same shapes, other weights, other logits
        idx = torch.tensor([[5]])
        logits = []
        for model in models:
            eager = model.step(idx, model.new_cache(1, idx.device, torch.float32))
            cache = model.new_cache(1, idx.device, torch.float32)
            frozen = tl.decode_step(model, True)(idx, cache)
            assert torch.allclose(frozen, eager, atol=1e-5)
            logits.append(frozen)
        assert not torch.allclose(*logits)


def test_a_step_that_cannot_compile_decodes_eagerly_with_one_line(monkeypatch, capsys):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("C++ compiler not found\nlong details")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    model = tiny()
    idx = torch.tensor([[1]])
    with torch.no_grad():
        logits = tl.decode_step(model, True)(idx, model.new_cache(1, torch.device("cpu"), torch.float32))
        eager = model.step(idx, model.new_cache(1, torch.device("cpu"), torch.float32))
    assert torch.equal(logits, eager)
    err = capsys.readouterr().err
    assert "decoding eagerly: the decode step could not be compiled (C++ compiler not found); " \
           "--no-compile_decode skips trying" in err


def test_without_a_cpp_compiler_decoding_is_eager_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    tl.compiler_missing.cache_clear()
    try:
        cfg = tl.build_config({"device": "cpu"})
        assert not tl.decode_compiles(cfg, torch.device("cpu"), frozen=True)
        assert "decoding eagerly: no C++ compiler was found" in capsys.readouterr().err
    finally:
        tl.compiler_missing.cache_clear()
        tl.say_once.cache_clear()


@pytest.mark.slow
def test_cli_quantize_and_compile_decode(run_args, tmp_path, capsys):
    assert tl.main(run_args("--max_steps", "30")) == 0
    out = ["--out_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert tl.main(["--generate_only", *out, "--quantize", "int8", "--num_samples", "3",
                    "--temperature", "0"]) == 0  # eager (run_args): the compiled int8 step is tested above
    text = capsys.readouterr().out
    assert [f"--- sample {i}/3 ---" in text for i in (1, 2, 3)] == [True] * 3
    samples = text.split("--- sample ")[1:]
    assert samples[0].split("\n", 1)[1] == samples[2].split("\n", 1)[1]  # greedy: the same text
    full = tl.evaluate_checkpoint(tl.resolve(["--eval_only", *out]))
    int8 = tl.evaluate_checkpoint(tl.resolve(["--eval_only", *out, "--quantize", "int8"]))
    assert "int8 weights" in capsys.readouterr().out
    assert int8["loss"] != full["loss"] and abs(int8["loss"] - full["loss"]) < 0.05 * full["loss"]
    for bad in (["--export", "safetensors", "--quantize", "int8"],
                ["--generate_only", "--compile_decode", "--no-kv_cache"]):
        assert tl.main([*bad, *out]) == 2
        assert "--" in capsys.readouterr().err
    assert not (tmp_path / "out" / "export-safetensors").exists()
