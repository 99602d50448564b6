import numpy as np
import pytest
import torch
from conftest import make_corpus, tl


def prepared(tmp_path, corpus, **overrides):
    cfg = tl.build_config({"data_path": str(corpus), "cache_dir": str(tmp_path / "cache"),
                           "block_size": 16, **overrides})
    c = tl.load_corpus(cfg)
    tok = tl.build_tokenizer(cfg, c)
    return cfg, tok, tl.prepare_data(cfg, c, tok)


def test_token_files_cached_and_split_deterministic(tmp_path, corpus, capsys):
    cfg, tok, splits = prepared(tmp_path, corpus)
    first = capsys.readouterr().out
    assert "encoded" in first and "trained char" in first
    _, _, again = prepared(tmp_path, corpus)
    second = capsys.readouterr().out
    assert "reusing token files" in second and "encoded" not in second and "trained" not in second
    whole = np.asarray(tok.encode(corpus.read_text().strip()), dtype=np.uint16)  # one document
    n_val = int(len(whole) * cfg.val_fraction)
    assert np.array_equal(again["train"].tokens(), whole[:-n_val])
    assert np.array_equal(again["val"].tokens(), whole[-n_val:])
    assert splits["train"].tokens().dtype == np.uint16


def test_cache_key_changes_with_corpus(tmp_path, corpus, capsys):
    prepared(tmp_path, corpus)
    corpus.write_text(corpus.read_text() + "more text\n")
    capsys.readouterr()
    prepared(tmp_path, corpus)
    assert "encoded" in capsys.readouterr().out


def test_large_vocab_uses_uint32():
    assert tl.token_dtype(65536) == np.uint16 and tl.token_dtype(65537) == np.uint32


def test_batches_are_shifted_windows_and_seeded(tmp_path, corpus):
    cfg, _, splits = prepared(tmp_path, corpus)
    x, y = tl.get_batch(splits["train"], 8, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = tl.get_batch(splits["train"], 8, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(x, x2)


def test_memmap_gives_same_batches(tmp_path, corpus):
    _, _, ram = prepared(tmp_path, corpus)
    _, _, mm = prepared(tmp_path, corpus, memmap_dataset=True)
    assert mm["train"].array is None
    a = tl.get_batch(ram["train"], 4, 16, torch.Generator().manual_seed(3), torch.device("cpu"))
    b = tl.get_batch(mm["train"], 4, 16, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bpe_data(tmp_path, corpus):
    _, tok, splits = prepared(tmp_path, corpus, tokenizer="bpe", bpe_vocab_size=300)
    assert tok.eot_id is not None and tok.vocab_size <= 300
    assert len(splits["train"]) < len(corpus.read_text())  # merges shorten the text


def test_too_small_corpus_refused(tmp_path):
    tiny = make_corpus(tmp_path / "tiny.txt", n_lines=2)
    with pytest.raises(tl.TinyLLMError, match="split has .* tokens but needs at least"):
        prepared(tmp_path, tiny, block_size=64)


def test_default_corpus_is_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/tiny_corpus.txt here
    corpus = tl.load_corpus(tl.Config())
    assert "pydoc_data" in corpus.name and len(corpus.text) > 100_000
    assert "--data_path" in capsys.readouterr().out
