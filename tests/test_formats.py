"""Every corpus users have: JSON Lines, Parquet and compressed text give the same token files as
the same documents in one .txt with <|endoftext|> markers; bad records are counted and reported.

Needs (requirements-dev.txt): pyarrow, zstandard."""

import bz2
import gzip
import json
import lzma

import numpy as np
import pytest
from conftest import tl

DOCS = [f"Story {i}: the cat sat on the mat, ünïcode 日本 {i * 7}.\nSecond line of {i}." for i in range(150)]
EOT = "<|endoftext|>"


def prepared(path, tmp_path, **settings):
    """(tokenizer JSON, train tokens, val tokens) of the corpus at `path`."""
    cfg = tl.build_config({"data_path": str(path), "cache_dir": str(tmp_path / "cache"), "block_size": 8,
                           **settings})
    corpus = tl.load_corpus(cfg)
    tok = tl.build_tokenizer(cfg, corpus)
    splits = tl.prepare_data(cfg, corpus, tok, tl.load_val_corpus(cfg))
    return tok.to_str(), splits["train"].tokens().copy(), splits["val"].tokens().copy()


def write_parquet(path, rows, column="text", row_group_size=40):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({column: rows, "id": list(range(len(rows)))})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def stories(tmp_path):
    """The same 150 documents in every format, one base name (a document's split key is its
    file's path without the format's ending, so every format splits them alike)."""
    folder = tmp_path / "data"
    folder.mkdir()
    plain = (EOT.join(DOCS)).encode()
    lines = "".join(json.dumps({"text": d, "id": i}, ensure_ascii=i % 2 == 0) + "\n"  # escaped and raw
                    for i, d in enumerate(DOCS))
    import zstandard
    files = {
        ".txt": plain, ".txt.gz": gzip.compress(plain), ".txt.bz2": bz2.compress(plain),
        ".txt.xz": lzma.compress(plain), ".txt.zst": zstandard.ZstdCompressor().compress(plain),
        ".jsonl": lines.encode(), ".jsonl.gz": gzip.compress(lines.encode()),
        ".jsonl.zst": zstandard.ZstdCompressor().compress(lines.encode()),
    }
    for suffix, data in files.items():
        (folder / f"stories{suffix}").write_bytes(data)
    write_parquet(folder / "stories.parquet", DOCS)
    return folder


@pytest.mark.parametrize("suffix", [".txt.gz", ".txt.bz2", ".txt.xz", ".txt.zst", ".jsonl", ".jsonl.gz",
                                    ".jsonl.zst", ".parquet"])
def test_every_format_gives_the_token_files_of_the_plain_text(stories, tmp_path, suffix):
    tok, train, val = prepared(stories / "stories.txt", tmp_path)
    other_tok, other_train, other_val = prepared(stories / f"stories{suffix}", tmp_path)
    assert other_tok == tok and np.array_equal(other_train, train) and np.array_equal(other_val, val)
    # split by documents, not empty; which ~10% go to val depends on the paths' hashes (tmp dir)
    assert 0 < len(val) < len(train) / 2


def test_a_directory_of_shards_reads_every_format(stories, tmp_path, capsys):
    files = tl.resolve_data_path(str(stories))
    assert sorted(f.name for f in files) == sorted(p.name for p in stories.iterdir())
    corpus = tl.load_corpus(tl.Config(data_path=str(stories), cache_dir=str(tmp_path / "cache")))
    assert corpus.documents == 9 * len(DOCS)
    assert f"{9 * len(DOCS):,} document(s)" in capsys.readouterr().out


def test_bad_jsonl_lines_are_skipped_counted_and_reported(tmp_path, capsys):
    lines = [json.dumps({"text": "good one"}), "{not json", json.dumps(["a list"]), "",
             json.dumps({"title": "no text"}), json.dumps({"text": 5}), json.dumps({"text": "good two"})]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    corpus = tl.load_corpus(tl.Config(data_path=str(path)))
    out = capsys.readouterr().out
    assert (f'data: skipped 4 of 6 lines of {path} (not JSON, not an object, no "text"): lines 2, 3, 5, ...'
            in out)
    assert "".join(b for _, blocks in corpus.sources() for b in blocks) == f"good one{EOT}good two"
    assert corpus.documents == 2
    assert tl.load_corpus(tl.Config(data_path=str(path), text_field="title")).documents == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + "[1]\n")
    with pytest.raises(tl.TinyLLMError, match='has no usable line: all 2 are no "text", not an object; '
                                              'point --text_field'):
        tl.load_corpus(tl.Config(data_path=str(tmp_path / "bad.jsonl")))


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq
    path = tmp_path / "shard.parquet"
    write_parquet(path, [*DOCS[:99], None], row_group_size=25)  # 4 row groups, one null row
    groups, real = [], pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        groups.append(row_groups)
        return real(self, *args, row_groups=row_groups, **kwargs)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    corpus = tl.load_corpus(tl.Config(data_path=str(path)))
    assert groups == [[0], [1], [2], [3]] and corpus.documents == 99
    assert f'skipped 1 of 100 rows of {path} (no string in "text")' in capsys.readouterr().out
    with pytest.raises(tl.TinyLLMError, match='has no column "body"; its columns are text, id: point '
                                              '--text_field'):
        tl.load_corpus(tl.Config(data_path=str(path), text_field="body"))


def test_a_corrupt_or_truncated_archive_is_one_line(tmp_path, run_args, capsys):
    data = gzip.compress((EOT.join(DOCS)).encode())
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    assert tl.main(run_args("--data_path", str(tmp_path / "cut.txt.gz"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --data_path {tmp_path / 'cut.txt.gz'} is not a valid .gz archive (")
    assert "corrupt or truncated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_val_data_is_the_val_split(stories, tmp_path, run_args, capsys):
    held_out = tmp_path / "held_out.jsonl"
    held = [f"Story {i}: the mat sat on the cat." for i in range(20)]  # characters the tokenizer knows
    held_out.write_text("".join(json.dumps({"text": h}) + "\n" for h in held))
    tok_json, train, val = prepared(stories / "stories.txt", tmp_path, val_data=str(held_out))
    tok = tl.TextTokenizer.from_str(tok_json)
    assert val.tolist() == tok.encode(EOT.join(held))
    assert train.tolist() == tok.encode(EOT.join(DOCS))  # every training document, none held out
    assert tl.main(run_args("--data_path", str(stories / "stories.txt"), "--val_data", str(held_out))) == 0
    assert "split by --val_data" in capsys.readouterr().out


def test_eval_only_takes_every_format(run_args, tmp_path, capsys):
    assert tl.main(run_args()) == 0
    path = tmp_path / "eval.jsonl.gz"
    record = json.dumps({"text": "the cat sat on a mat and ran far away"}) + "\n"
    path.write_bytes(gzip.compress((record * 20).encode()))
    capsys.readouterr()
    assert tl.main(["--eval_only", "--out_dir", str(tmp_path / "out"), "--eval_data", str(path)]) == 0
    assert "bits per byte" in capsys.readouterr().out


def test_text_field_reaches_every_reader(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(path, DOCS[:120], column="body")
    assert tl.load_corpus(tl.Config(data_path=str(path), text_field="body")).documents == 120


def test_text_without_whitespace_is_cut_into_bounded_pieces(tmp_path):
    """A 300,000-character line with no whitespace: BPE training gets it in runs of at most
    1,000 characters (a longer 'word' costs the trainer minutes per merge), encoding in pieces
    of at most NO_CUT_LIMIT characters; nothing is dropped, and ordinary text is not cut."""
    import random
    import re
    rng = random.Random(0)
    line = "".join(rng.choice("abcdefghij") for _ in range(300_000))
    path = tmp_path / "one_line.txt"
    path.write_text(f"Normal words here.\n{line}\nMore normal words.\n")
    corpus = tl.load_corpus(tl.Config(data_path=str(path)))
    fed = list(tl.training_texts(corpus))
    assert "".join(fed) == path.read_text().strip()
    assert max(len(run) for piece in fed for run in re.findall(r"\S+", piece)) <= 1000
    assert fed[0].startswith("Normal words here.\n")  # cut only inside the long run
    long_line = line * 3  # 900,000 characters without a safe cut
    pieces = tl.text_chunks(long_line, 1 << 16)
    assert "".join(pieces) == long_line and max(map(len, pieces)) <= tl.NO_CUT_LIMIT and len(pieces) > 3
    tok = tl.train_bpe_tokenizer(iter(fed), 300)
    assert tok.decode(tok.encode(line[:5000])) == line[:5000]


def test_fast_encoding_gives_the_ids_of_the_tokenizers_library(tmp_path, monkeypatch, capsys):
    """Token files are encoded with tiktoken on our own ranks when it is installed: the same
    files as HF's encoder makes (the oracle), which is used without tiktoken, with a note."""
    import importlib.util
    text = "".join(f"Doc {i}: naïve café, don't!  日本語 😀 {i * 31}\n\tindented   line\n"
                   for i in range(400))
    (tmp_path / "c.txt").write_text(text)
    cfg = tl.build_config({"data_path": str(tmp_path / "c.txt"), "cache_dir": str(tmp_path / "a"),
                           "tokenizer": "bpe", "bpe_vocab_size": 400, "block_size": 8})
    corpus = tl.load_corpus(cfg)
    tok = tl.build_tokenizer(cfg, corpus)
    assert tl.fast_batch_encoder(tok) != tok.encode_batch  # tiktoken is in requirements-dev.txt
    fast = tl.prepare_data(cfg, corpus, tok)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tiktoken" else real(name, *a))
    assert tl.fast_batch_encoder(tok) == tok.encode_batch
    slow = tl.prepare_data(tl.build_config({**tl.asdict(cfg), "cache_dir": str(tmp_path / "b")}), corpus, tok)
    assert "pip install tiktoken" in capsys.readouterr().out
    for split in ("train", "val"):
        assert np.array_equal(fast[split].tokens(), slow[split].tokens()) and len(fast[split]) > 100


def test_tokenizer_training_gets_bounded_pieces_of_one_huge_document(tmp_path):
    """One document without markers (a multi-gigabyte .txt): the BPE trainer buffers a few
    hundred of the pieces it is given, so they must stay small however long the document is."""
    text = " ".join(f"word{i % 97} and more words," for i in range(60_000))  # ~1.5 MB, one document
    (tmp_path / "one.txt").write_text(text)
    corpus = tl.load_corpus(tl.Config(data_path=str(tmp_path / "one.txt")))
    fed = list(tl.training_texts(corpus))
    assert "".join(fed) == text and len(fed) > 10 and max(map(len, fed)) <= 1 << 16


def test_token_files_are_read_in_chunks_not_mapped(tmp_path, monkeypatch):
    """Reading a whole token file through a memmap counts every page of it as resident memory;
    preparing the data (tail split, start ids, hashes) reads the files in chunks instead."""
    path = tmp_path / "t.bin"
    tokens = np.arange(10_000, dtype=np.uint16)
    tokens.tofile(path)
    for start, stop, size in ((0, None, 4096), (17, 9_999, 1000), (5, 6, 1), (0, 10_000, 1 << 22)):
        chunks = list(tl.token_chunks(path, np.uint16, start, stop, size))
        assert np.array_equal(np.concatenate(chunks), tokens[start:stop]) and max(map(len, chunks)) <= size

    def no_memmap(*args, **kwargs):
        raise AssertionError("a token file was mapped while the data was prepared")
    monkeypatch.setattr(tl.np, "memmap", no_memmap)
    (tmp_path / "one.txt").write_text("a single long document\n" * 300)  # one document: tail split
    for memmap in (True, False):
        cfg = tl.build_config({"data_path": str(tmp_path / "one.txt"), "block_size": 8,
                               "cache_dir": str(tmp_path / f"c{memmap}"), "memmap_dataset": memmap})
        corpus = tl.load_corpus(cfg)
        splits = tl.prepare_data(cfg, corpus, tl.build_tokenizer(cfg, corpus))
        assert len(splits["val"]) > 0 and splits["train"].start_ids and splits["val"].tokens_per_byte > 0


def test_empty_documents_are_not_counted(tmp_path):
    """Markers at the start, the end, twice in a row, or around whitespace end no document."""
    text = f"{EOT}\n one {EOT}{EOT}  \n{EOT} two {EOT}\n\n{EOT}" + "x" * 5000 + f"{EOT} \n"
    (tmp_path / "m.txt").write_text(text)
    assert tl.load_corpus(tl.Config(data_path=str(tmp_path / "m.txt"))).documents == 3
