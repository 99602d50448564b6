import pytest
import torch
from conftest import tl


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = tl.apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]  # positive divided, negative multiplied


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    values, ids = tl.top_k_filter(logits[:, [2, 0, 3, 1]], 2)  # the k most likely, in order, and where
    assert ids.tolist() == [[1, 3]] and torch.equal(values, logits[:, :2])
    assert torch.isinf(tl.top_p_filter(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(tl.top_p_filter(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(tl.top_p_filter(logits, 1.0)).any()
    assert torch.isinf(tl.top_p_filter(logits, 0.0)).tolist() == [[False, True, True, True]]  # never empty


def test_sampling_draws_in_proportion_and_never_a_filtered_token():
    """The inverse-CDF draw against the probabilities it was given (20,000 draws, within 0.015),
    zero-probability tokens never; top-k and top-p draw only among the tokens they keep."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0]]).expand(20000, 6)
    counts = torch.bincount(tl.sample_index(probs, g).flatten(), minlength=6) / 20000
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.015)
    logits = torch.randn(1, 500, generator=g).expand(4000, 500)
    hist = torch.zeros(4000, 1, dtype=torch.long)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = tl.choose_next(logits, hist, tl.SampleSettings(1, temperature=1.0, top_k=3), g)
    assert set(drawn.flatten().tolist()) == top3  # all three, and nothing else
    probs = logits[0].softmax(-1)
    nucleus = torch.sort(probs, descending=True)
    keep = int((nucleus.values.cumsum(0) - nucleus.values < 0.5).sum())
    drawn = tl.choose_next(logits, hist, tl.SampleSettings(1, temperature=1.0, top_p=0.5), g)
    assert set(drawn.flatten().tolist()) <= set(nucleus.indices[:keep].tolist())
    both = tl.choose_next(logits, hist, tl.SampleSettings(1, temperature=1.0, top_k=50, top_p=0.5), g)
    assert set(both.flatten().tolist()) <= set(nucleus.indices[:min(keep, 50)].tolist())


def test_non_finite_logits_are_an_error_not_a_token():
    """NaN logits give NaN probabilities: no token may come of them (one past the vocabulary would)."""
    hist = torch.zeros(1, 1, dtype=torch.long)
    for top_k in (0, 2):
        s = tl.SampleSettings(max_new_tokens=1, temperature=1.0, top_k=top_k)
        with pytest.raises(RuntimeError, match="not finite"):
            tl.choose_next(torch.full((1, 5), float("nan")), hist, s, torch.Generator().manual_seed(0))


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """Logits divided by 1e-40 overflow to inf and softmax gives NaN: below 1e-4 it is argmax."""
    logits, hist = torch.tensor([[0.1, 3.0, 0.2]]), torch.zeros(1, 1, dtype=torch.long)
    for t in (1e-40, 5e-5):
        s = tl.SampleSettings(max_new_tokens=1, temperature=t)
        assert tl.choose_next(logits, hist, s, torch.Generator().manual_seed(0)).item() == 1


def test_temperature_zero_is_argmax_and_seed_repeats():
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    hist = torch.zeros(1, 1, dtype=torch.long)
    greedy = tl.SampleSettings(max_new_tokens=1, temperature=0)
    assert tl.choose_next(logits, hist, greedy, None).item() == 1
    s = tl.SampleSettings(max_new_tokens=1, temperature=1.5, top_k=2, top_p=0.9)
    draw = [tl.choose_next(logits.expand(64, 3), hist.expand(64, 1), s,
                           torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])


def test_streamer_holds_back_partial_utf8(capsys):
    tok = tl.train_bpe_tokenizer(iter(["plain text only " * 50]), 270)
    ids = tok.encode("日本")  # unseen characters: several byte tokens each
    streamer = tl.TextStreamer(tok)
    for i in [*ids, tok.eot_id]:
        streamer(torch.tensor([[i]]))
    assert capsys.readouterr().out == "日本"  # whole characters only, and no end-of-text marker


def test_growing_text_is_the_whole_decode_at_every_token():
    """GrowingText decodes only the ids after the last complete character; at every length its
    text must be what decoding them all gives (reply_text), through characters split over several
    byte tokens, random ids (invalid UTF-8 included) and for a char-level vocabulary too."""
    bpe = tl.train_bpe_tokenizer(iter(["plain text, café and naïve " * 50]), 300)
    char = tl.train_char_tokenizer("ab cé\n")
    g = torch.Generator().manual_seed(0)
    for tok, text in ((bpe, "café 日本 🙂 plain naïve"), (char, "ab cé cab\n")):
        ids = tok.encode(text) + torch.randint(tok.vocab_size, (40,), generator=g).tolist()
        prompt = tok.encode("a")
        growing = tl.GrowingText(tok, prompt)
        for n in range(len(ids) + 1):
            assert growing.of(ids[:n]) == tl.reply_text(tok, prompt, ids[:n])


def test_generation_stops_at_end_of_text(monkeypatch):
    """A row that produces the stop token is padded with it; generation ends when all rows are
    done (as transformers' generate does with its EOS token)."""
    model = tl.GPT(tl.Config(n_layer=1, n_embd=32, block_size=16), 10).eval()
    script = iter([[[7], [3]], [[3], [7]], [[1], [1]]])
    monkeypatch.setattr(tl, "choose_next", lambda *a: torch.tensor(next(script)))
    prompt = torch.zeros(2, 2, dtype=torch.long)
    out = tl.generate(model, prompt, tl.SampleSettings(max_new_tokens=20, temperature=0), stop_ids=[7])
    assert out[:, 2:].tolist() == [[7, 7], [3, 7]]
    script = iter([[[7], [3]]] * 5)
    out = tl.generate(model, prompt, tl.SampleSettings(max_new_tokens=5, temperature=0))
    assert out.shape == (2, 7)  # without a stop token: all max_new_tokens
