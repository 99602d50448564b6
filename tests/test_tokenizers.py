import pytest
from conftest import tl

TEXT = "Hello, wörld!\n\n\tTabs  and   spaces 日本語 😀 naïve café\r\nend\n  \n x"


def test_char_round_trip():
    tok = tl.train_char_tokenizer(TEXT)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and tok.decode(ids) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + 1  # and <|endoftext|>, the document separator
    assert tok.decode([tok.eot_id]) == "<|endoftext|>" and tok.encode("a<|endoftext|>b")[1] == tok.eot_id
    assert tok.unknown_chars("Hez!Q") == ["Q", "z"]


def test_bpe_round_trip_and_special_token():
    tok = tl.train_bpe_tokenizer(iter([TEXT * 20]), 300)
    assert tok.vocab_size <= 300
    for text in (TEXT, "unseen ∑ text ✓", "a<|endoftext|>b"):
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("one<|endoftext|>two")
    assert ids.count(tok.eot_id) == 1 and tok.start_ids() == [tok.eot_id]
    assert tok.unknown_chars("∑✓") == []  # byte-level: nothing is unknown


def test_tokenizer_survives_save_and_reload(tmp_path):
    tok = tl.train_bpe_tokenizer(iter([TEXT * 10]), 280)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    again = tl.load_tokenizer_file(str(path))
    assert again.encode(TEXT) == tok.encode(TEXT) and again.eot_id == tok.eot_id


def test_chunked_encoding_equals_whole_text():
    text = ("word  \n\n\n  indented\nnext line\n   \nx\ty\n" * 300) + "tail"
    tok = tl.train_bpe_tokenizer(iter([text]), 320)
    pieces = tl.text_chunks(text, size=100)
    assert "".join(pieces) == text and len(pieces) > 10
    chunked = [i for ids in tok.encode_batch(pieces) for i in ids]
    assert chunked == tok.encode(text)


def test_bad_tokenizer_path(tmp_path):
    with pytest.raises(tl.TinyLLMError, match="does not exist"):
        tl.load_tokenizer_file(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(tl.TinyLLMError, match="not a HuggingFace tokenizer.json"):
        tl.load_tokenizer_file(str(tmp_path / "bad.json"))
