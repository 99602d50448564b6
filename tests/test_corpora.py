"""Real corpora: directories, globs, URLs, documents, streaming and the split."""

import http.server
import os
import threading

import numpy as np
import pytest
from conftest import tl

EOT = "<|endoftext|>"


def prepared(tmp_path, spec, **overrides):
    cfg = tl.build_config({"data_path": spec, "cache_dir": str(tmp_path / "cache"), "block_size": 8,
                           **overrides})
    corpus = tl.load_corpus(cfg)
    tok = tl.build_tokenizer(cfg, corpus)
    return corpus, tok, tl.prepare_data(cfg, corpus, tok)


def stories(n: int, seed: int = 0) -> list[str]:
    words = ["once", "upon", "a", "time", "the", "little", "dog", "found", "a", "red", "ball", "Lily",
             "smiled", "and", "played", "all", "day", "happy", "sun"]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=rng.integers(8, 30))).capitalize() + "." for _ in range(n)]


def test_directory_glob_and_comma_list(tmp_path, capsys):
    books = tmp_path / "books"
    (books / "part2").mkdir(parents=True)
    (books / "b.txt").write_text("bravo text\n" * 50)
    (books / "a.md").write_text("alpha text\n" * 50)
    (books / "part2" / "c.txt").write_text("charlie text\n" * 50)
    (books / "skip.json").write_text("{}")
    assert tl.resolve_data_path(str(books)) == [books / "a.md", books / "b.txt", books / "part2" / "c.txt"]
    assert tl.resolve_data_path(str(books / "*.txt")) == [books / "b.txt"]
    assert tl.resolve_data_path(f"{books / 'b.txt'},{books}/**/*.txt") == \
        [books / "b.txt", books / "part2" / "c.txt"]
    corpus, tok, splits = prepared(tmp_path, str(books))
    assert corpus.documents == 3 and len(corpus.files) == 3
    text = tok.decode(np.concatenate([splits["train"].tokens(), splits["val"].tokens()]).tolist())
    assert text.count(EOT) == 2 and text.startswith("alpha") and "charlie" in text  # file = document


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A web server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: QuietHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_is_downloaded_once_and_reused(tmp_path, http_root, monkeypatch, capsys):
    root, base = http_root
    (root / "stories.txt").write_text(EOT.join(stories(200)))
    monkeypatch.chdir(tmp_path)  # data/ is relative to where the user runs
    corpus, _, splits = prepared(tmp_path, f"{base}/stories.txt")
    assert (tmp_path / "data" / "stories.txt").read_text() == (root / "stories.txt").read_text()
    assert "downloaded" in capsys.readouterr().out and corpus.documents == 200
    (root / "stories.txt").unlink()  # the server no longer has it: the copy in data/ is used
    prepared(tmp_path, f"{base}/stories.txt")
    assert "reusing data/stories.txt" in capsys.readouterr().out
    assert not list((tmp_path / "data").glob(".*tmp*"))
    with pytest.raises(tl.TinyLLMError, match="could not be downloaded .*404"):
        tl.resolve_data_path(f"{base}/missing.txt")
    assert not (tmp_path / "data" / "missing.txt").exists()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_documents_split_at_markers_with_end_of_text_between(tmp_path, kind):
    docs = stories(150)
    (tmp_path / "s.txt").write_text(f"\n{EOT}\n".join(docs) + f"\n{EOT}\n")
    corpus, tok, splits = prepared(tmp_path, str(tmp_path / "s.txt"), tokenizer=kind, bpe_vocab_size=300)
    assert corpus.documents == 150  # the trailing marker ends the last one: nothing empty counts
    train, val = (tok.decode(splits[s].tokens().tolist()).split(EOT) for s in ("train", "val"))
    assert sorted(train + val) == sorted(docs)  # every document whole, in exactly one split
    assert 1 <= len(val) <= 45  # about val_fraction of 150 documents, chosen by a hash of the (tmp) path
    again = prepared(tmp_path / "again", str(tmp_path / "s.txt"), tokenizer=kind, bpe_vocab_size=300)[2]
    assert np.array_equal(again["val"].tokens(), splits["val"].tokens())  # deterministic
    assert tok.vocab[EOT] == tok.eot_id and EOT not in "".join(tok.vocab) .replace(EOT, "")


def test_few_documents_split_by_tail(tmp_path):
    (tmp_path / "one.txt").write_text("a single long document\n" * 200)
    corpus, tok, splits = prepared(tmp_path, str(tmp_path / "one.txt"))
    whole = tok.encode(("a single long document\n" * 200).strip())
    assert np.array_equal(np.concatenate([splits["train"].tokens(), splits["val"].tokens()]), whole)
    assert len(splits["val"]) == int(len(whole) * 0.1)


def test_streaming_pieces_encode_like_the_whole_text(tmp_path):
    """Pieces cut anywhere the reader cuts (tiny sizes here) give the tokens of the whole text."""
    text = ("word  \n\n\n  indented\nnext line\n   \nx\ty z\n" * 200) + "tail, no newline" * 40
    (tmp_path / "t.txt").write_text(text)
    corpus, tok, _ = prepared(tmp_path, str(tmp_path / "t.txt"), tokenizer="bpe", bpe_vocab_size=300)
    for size in (7, 64, 1000):
        pieces = [p for _, p, _ in tl.document_pieces(corpus, size)]
        assert "".join(pieces) == text.strip() and max(map(len, pieces)) <= 3 * size + 40
        assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text.strip())


def test_reads_in_bounded_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(tl, "READ_SIZE", 1000)
    text = EOT.join(stories(300))
    (tmp_path / "s.txt").write_text(text + "é" * 3000)  # multi-byte characters across block edges
    assert all(len(b) <= 1000 for b in tl.read_blocks(tmp_path / "s.txt"))
    assert "".join(tl.read_blocks(tmp_path / "s.txt")) == text + "é" * 3000
    corpus, tok, splits = prepared(tmp_path, str(tmp_path / "s.txt"))
    assert corpus.documents == 300


def test_cache_reused_until_the_file_changes(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("some text to cache\n" * 100)
    prepared(tmp_path, str(tmp_path / "c.txt"))
    assert "encoded" in capsys.readouterr().out
    prepared(tmp_path, str(tmp_path / "c.txt"))
    assert "reusing token files" in capsys.readouterr().out
    os.utime(tmp_path / "c.txt", ns=(1, 1))  # touched: same bytes, new mtime
    prepared(tmp_path, str(tmp_path / "c.txt"))
    assert "encoded" in capsys.readouterr().out


def test_fingerprint_reads_only_head_and_tail(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (5 << 20))
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def seek(self, *a):
            return self.f.seek(*a)
    monkeypatch.setattr(tl, "open", lambda p, m="r": Counting(real_open(p, m)), raising=False)
    tl.file_fingerprint(big)
    assert sum(reads) == 2 << 20  # 2 MB of a 5 MB file


def test_a_url_that_cannot_be_downloaded_names_its_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused = r"^--val_data http://127.0.0.1:9/v.txt could not be downloaded"
    with pytest.raises(tl.TinyLLMError, match=refused):
        tl.resolve_data_path("http://127.0.0.1:9/v.txt", "--val_data")
    assert not (tmp_path / "data" / "v.txt").exists()
