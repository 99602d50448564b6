import copy
import itertools
import math

import pytest
import torch
from conftest import tl

SWITCHES = list(itertools.product(["layernorm", "rmsnorm"], ["gelu", "swiglu"], ["learned", "rope"],
                                  [False, True], [0, 5], [False, True], [0, 2, 1]))
VOCAB = 61


def tiny(norm="rmsnorm", mlp="swiglu", pos="rope", qk=False, window=0, parallel=False, kv=0,
         n_layer=2, **kw) -> tl.GPT:
    cfg = tl.Config(n_layer=n_layer, n_head=4, n_kv_head=kv, n_embd=32, block_size=16, norm=norm, mlp=mlp,
                    pos_encoding=pos, qk_norm=qk, sliding_window=window, parallel_block=parallel, **kw)
    tl.validate(cfg)
    return tl.GPT(cfg, VOCAB).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_initial_loss_is_log_vocab(arch):
    torch.manual_seed(0)
    cfg = tl.build_config({"arch": arch, "n_layer": 2, "n_embd": 32, "block_size": 16})
    model = tl.GPT(cfg, 500)
    x, y = torch.randint(500, (8, 16)), torch.randint(500, (8, 16))
    loss = model(x, y)[1].item()
    assert abs(loss - math.log(500)) < 0.1


def test_parameter_count_and_tying():
    tied, untied = tiny(), tiny(tie_weights=False)
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    assert tied.lm_head.weight is tied.wte.weight


SPEEDRUN = [{"mlp": "relu2"}, {"logit_softcap": 2.0}, {"mlp": "relu2", "logit_softcap": 2.0, "qk": True},
            {"zero_init_out_proj": True, "mlp": "gelu", "pos": "learned"}, {"unet_skips": True},
            {"unet_skips": True, "n_layer": 5, "window": 5, "mlp": "relu2"}]


@pytest.mark.parametrize("switches", [*SWITCHES, *SPEEDRUN], ids=lambda s: "-".join(map(str, s)))
def test_causal_and_kv_cache_match(switches):
    """Changing a later token never changes earlier logits; cached decoding gives the same logits
    as full forward passes, and the same greedy tokens, for every switch combination."""
    torch.manual_seed(0)
    model = tiny(**switches) if isinstance(switches, dict) else tiny(*switches)
    if model.cfg.zero_init_out_proj:  # blocks that start as the identity: give them something to do
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn_like(p) * 0.05) if name.endswith("out_proj.weight") else None
    idx = torch.randint(VOCAB, (2, 16))
    with torch.no_grad():
        logits = model(idx)[0]
        changed = idx.clone()
        changed[:, 9] = (changed[:, 9] + 1) % VOCAB
        logits2 = model(changed)[0]
        assert torch.allclose(logits[:, :9], logits2[:, :9], atol=1e-6)
        assert not torch.allclose(logits[:, 9:], logits2[:, 9:])
        cache = model.new_cache(2, idx.device, torch.float32)
        step_logits = [model(idx[:, :4], cache=cache)[0]]  # prefill 4, then decode one at a time
        step_logits += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 16)]
        assert torch.allclose(torch.cat(step_logits, 1), logits, atol=1e-5)
    greedy = tl.SampleSettings(max_new_tokens=13, temperature=0)
    with_cache = tl.generate(model, idx[:, :3], greedy)
    greedy.kv_cache = False
    assert torch.equal(with_cache, tl.generate(model, idx[:, :3], greedy))


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("window", [0, 5])
def test_generation_past_block_size(pos, window):
    model = tiny(pos=pos, window=window)
    for kv_cache in (True, False):
        s = tl.SampleSettings(max_new_tokens=50, temperature=1.0, kv_cache=kv_cache)
        out = tl.generate(model, torch.zeros(1, 20, dtype=torch.long), s,
                          torch.Generator().manual_seed(0))
        assert out.shape == (1, 70)


def test_sliding_window_limits_what_a_token_sees():
    cfg = tl.Config(n_layer=1, n_head=4, n_embd=32, block_size=16, sliding_window=4)
    model = tl.GPT(cfg, VOCAB).eval()
    idx = torch.randint(VOCAB, (1, 16))
    changed = idx.clone()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    # position p sees p-3..p: token 5 reaches positions 5..8 only
    assert not torch.allclose(a[0, 8], b[0, 8])
    assert torch.allclose(a[0, 9:], b[0, 9:], atol=1e-6)


def test_gqa_groups_query_heads_with_repeat_interleave():
    """Query head h must read key/value head h // (n_head / n_kv_head)."""
    torch.manual_seed(0)
    model = tiny(pos="learned", kv=2)
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        got = attn(x, model.positions, None, None, 0)
        q, k, v = attn.qkv(x).split([32, 16, 16], dim=-1)
        q = q.view(1, 6, 4, 8).transpose(1, 2)
        k = k.view(1, 6, 2, 8).transpose(1, 2)[:, [0, 0, 1, 1]]
        v = v.view(1, 6, 2, 8).transpose(1, 2)[:, [0, 0, 1, 1]]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
        ref = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32))
    assert torch.allclose(got, ref, atol=1e-5)


def test_kv_cache_holds_only_kv_heads():
    cache = tiny(kv=1).new_cache(3, torch.device("cpu"), torch.float32)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 1, 16, 8)


def test_rope_is_rotate_half_and_relative():
    rope = tl.RotaryPositions(tl.Config(n_embd=32, n_head=4, block_size=16))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    at = torch.tensor
    dots = [(rope.rotate(q, at([s])) * rope.rotate(k, at([s + 3]))).sum() for s in (0, 5, 9)]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), atol=1e-5)  # depends on offset only
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0  # pairs with index 4 (rotate-half), not index 1 (interleaved)
    y = rope.rotate(x, torch.tensor([1]))
    assert y[..., 4].abs() > 0 and y[..., 1] == 0


def test_bf16_sampling_copy_keeps_rope_in_fp32_and_training_model_untouched(capsys):
    model = tiny(pos="rope")
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.positions.cos.dtype == torch.float32 and half.wte.weight.dtype == torch.bfloat16
    greedy = tl.SampleSettings(max_new_tokens=12, temperature=0)
    idx = torch.randint(VOCAB, (2, 3))
    with_cache = tl.generate(half, idx, greedy)
    greedy.kv_cache = False
    assert torch.equal(with_cache, tl.generate(half, idx, greedy))
    cache = half.new_cache(2, idx.device, tl.cache_dtype(torch.bfloat16, idx.device))
    assert cache.k[0].dtype == torch.float32  # attention in fp32 on CPU, the weights stay bf16
    logits = tl.next_logits_cached(half, idx, cache)
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), tl.next_logits_uncached(half, idx).float(), atol=3e-2)
    tok = tl.train_char_tokenizer("abcdefghij \n" * 5)
    small = tl.GPT(tl.Config(n_layer=1, n_embd=32, block_size=16), tok.vocab_size)
    tl.print_samples(small, tok, tl.Config(dtype="bfloat16", max_new_tokens=5), torch.device("cpu"))
    assert small.wte.weight.dtype == torch.float32 and "sample 1/1" in capsys.readouterr().out


def test_relu2_softcap_and_zero_init_compute_what_they_say():
    torch.manual_seed(0)
    relu2 = tiny(mlp="relu2").blocks[0].mlp
    x = torch.randn(3, 32)
    assert torch.allclose(relu2(x), relu2.out_proj(torch.relu(relu2.fc(x)) ** 2))
    assert relu2.fc.out_features == 4 * 32  # GELU's width
    plain = tiny()
    capped = tiny(logit_softcap=0.5)
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(VOCAB, (2, 8))
    with torch.no_grad():
        raw, soft = plain(idx)[0], capped(idx)[0]
        assert soft.abs().max() < 0.5 and torch.allclose(soft, 0.5 * torch.tanh(raw / 0.5))
        assert not torch.allclose(soft, raw, atol=1e-3)
        assert torch.allclose(capped(idx, idx)[1], torch.nn.functional.cross_entropy(
            soft.flatten(0, 1), idx.flatten()), atol=1e-6)  # the loss is the capped logits'
    zero = tiny(zero_init_out_proj=True)
    outs = [p for n, p in zero.named_parameters() if n.endswith("out_proj.weight")]
    assert len(outs) == 4 and all(not p.any() for p in outs)
    embedded = zero.positions.embed(zero.wte(idx), None)
    assert torch.equal(zero.trunk(idx, None), embedded)  # every block starts as the identity
    loss = zero(idx, idx)[1]
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in outs)  # and they learn from the first step


def test_unet_skips_join_each_early_block_to_its_late_twin():
    """--unet_skips on 5 blocks: block 0's output joins block 4's input and block 1's block 3's,
    each scaled by its own learned weight; the middle block has none. With the weights at 0 it is
    the plain model; the weights learn."""
    torch.manual_seed(0)
    unet = tiny(n_layer=5, unet_skips=True)
    assert unet.skip_weights.tolist() == [1.0, 1.0]
    with torch.no_grad():
        unet.skip_weights.copy_(torch.tensor([0.5, -2.0]))
    plain = tiny(n_layer=5)
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if k != "skip_weights"})
    idx = torch.randint(VOCAB, (2, 8))
    x = unet.positions.embed(unet.wte(idx), None)
    mask = tl.attention_mask(8, 0, idx.device)
    outs = []
    for layer, block in enumerate(unet.blocks):
        x = x + (-2.0 * outs[1] if layer == 3 else 0.5 * outs[0] if layer == 4 else 0)
        x = block(x, unet.positions, mask, None, layer)
        outs.append(x)
    with torch.no_grad():
        assert torch.allclose(unet.trunk(idx, None), x, atol=1e-6)
        assert not torch.allclose(unet(idx)[0], plain(idx)[0], atol=1e-3)
        unet.skip_weights.zero_()
        assert torch.allclose(unet(idx)[0], plain(idx)[0], atol=1e-6)
    unet.skip_weights.data.fill_(1.0)
    unet(idx, idx)[1].backward()
    assert unet.skip_weights.grad.abs().min() > 0
    with pytest.raises(tl.TinyLLMError, match="--unet_skips .* needs --n_layer 2"):
        tl.validate(tl.Config(n_layer=1, unet_skips=True))


def test_qk_norm_under_bf16_autocast_runs_torchs_fused_norm_without_a_warning():
    """The queries and keys come out of a bf16 linear layer under autocast; the norm's fp32 weight
    meets them in their dtype, so torch neither warns on the user's screen nor falls back."""
    import warnings
    torch.manual_seed(0)
    model = tiny(qk=True)
    x = torch.randint(VOCAB, (2, 16))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")
        logits, _ = model(x)
    assert torch.isfinite(logits).all()
    norm, h = tl.NORMS["rmsnorm"](32, model.cfg), torch.randn(4, 32)
    torch.nn.init.normal_(norm.weight)
    plain = torch.nn.RMSNorm(32, eps=model.cfg.norm_eps)
    plain.weight.data.copy_(norm.weight.data)
    assert torch.equal(norm(h), plain(h))  # in fp32, torch's own module exactly


@pytest.mark.parametrize("block, grad, flash", [(16, True, False), (16, False, True), (160, True, True)])
def test_bf16_training_on_cpu_keeps_torchs_plain_attention_for_short_contexts(block, grad, flash):
    """torch's flash attention backward in bf16 is several times slower than the plain path on
    CPUs for up to 128 queries: training there takes the plain one; evaluation (no gradients)
    and longer contexts keep flash."""
    torch.manual_seed(0)
    model = tl.GPT(tl.Config(n_layer=2, n_head=4, n_embd=32, block_size=block), VOCAB)
    x = torch.randint(VOCAB, (2, block))
    with torch.profiler.profile() as prof, torch.set_grad_enabled(grad), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)[1]
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention" in n for n in names) == flash
    if grad:
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
