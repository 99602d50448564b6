"""Round 3 of the hostile user's data (issue 26): records in a chat layout short of a field, OpenAI's
content parts, corpora of empty texts, truncated .zst and .xz archives, empty assistant replies.

Needs (requirements-dev.txt): pyarrow, zstandard."""

import json
import lzma

import pytest
from conftest import td, tl, ts

EOT = "<|endoftext|>"
QA = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def text_of(corpus):
    return "".join(b for _, blocks in corpus.sources() for b in blocks)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_an_alpaca_record_short_of_a_field_is_a_malformed_conversation(tmp_path, capsys):
    good = [{"instruction": f"reverse {w}", "input": "", "output": w[::-1]} for w in ("abc", "dog") * 50]
    path = write_jsonl(tmp_path / "alpaca.jsonl", [*good, {"instruction": "reverse"}, {"output": "cba"}])
    corpus = tl.load_corpus(tl.Config(data_path=str(path)))
    assert corpus.chat and corpus.documents == 100
    out = capsys.readouterr().out
    assert (f'skipped 2 of 102 lines of {path} (no "output", no "instruction"): lines 101, 102' in out)
    # plain text keeps a field named like Alpaca's, and a stray record of it is skipped, not a mix
    texts = [{"text": "the cat sat", "instruction": "ignored"}, {"text": "on the mat"}, {"instruction": "x"}]
    corpus = tl.load_corpus(tl.Config(data_path=str(write_jsonl(tmp_path / "t.jsonl", texts))))
    assert not corpus.chat and text_of(corpus) == f"the cat sat{EOT}on the mat"
    assert 'skipped 1 of 3 lines' in capsys.readouterr().out


def test_content_parts_are_joined_as_the_server_joins_them(tmp_path, capsys):
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    records = [{"messages": QA}, {"messages": [{"role": "user", "content": parts}, QA[1]]},
               {"messages": [{"role": "user", "content": image}, QA[1]]}]
    corpus = tl.load_corpus(tl.Config(data_path=str(write_jsonl(tmp_path / "c.jsonl", records))))
    assert corpus.documents == 2
    first, second = text_of(corpus).split(EOT)
    assert first == second  # the parts are the string they spell
    out = capsys.readouterr().out
    assert 'skipped 1 of 3 lines' in out and 'a content part of type "image_url"' in out and "lines 3" in out
    assert td.content_text(parts) == ts.message_text({"role": "user", "content": parts}, 0)[1] == "Hi there"


def test_a_corpus_of_empty_texts_is_refused_in_one_line(tmp_path, run_args, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}] * 20)
    assert tl.main(run_args("--data_path", str(path))) == 2
    err = one_line_error(capsys)
    assert err == (f'error: --data_path {path} has no record with text: all 20 lines have an empty "text"; '
                   f'put the text there, or point --text_field at the field that holds it')
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "the cat"}, {"text": ""}, {"text": " \n"},
                                                   {"text": "sat"}])
    corpus = tl.load_corpus(tl.Config(data_path=str(mixed)))
    assert corpus.documents == 2 and text_of(corpus) == f"the cat{EOT}sat"
    assert f'skipped 2 of 4 lines of {mixed} (an empty "text"): lines 2, 3' in capsys.readouterr().out


def test_a_parquet_column_of_empty_strings_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["", " ", None]}), tmp_path / "e.parquet")
    with pytest.raises(tl.TinyLLMError, match='has no row with text in "text": all 3 are empty or null'):
        tl.load_corpus(tl.Config(data_path=str(tmp_path / "e.parquet")))


@pytest.mark.parametrize("suffix", [".zst", ".xz"])
def test_a_truncated_zst_or_xz_archive_is_corrupt_or_truncated(tmp_path, run_args, capsys, suffix):
    zstandard = pytest.importorskip("zstandard")
    text = (EOT.join(f"Story {i}: the cat sat on the mat." for i in range(200))).encode()
    compress = zstandard.ZstdCompressor().compress if suffix == ".zst" else lzma.compress
    data = compress(text)
    path = tmp_path / f"cut.txt{suffix}"
    path.write_bytes(data[: len(data) // 2])
    assert tl.main(run_args("--data_path", str(path))) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: --data_path {path} is not a valid {suffix} archive (")
    assert "corrupt or truncated" in err
    # whole archives, of several frames for .zst, still read in full
    path.write_bytes(data + compress(f"{EOT}the end".encode()))
    assert text_of(tl.load_corpus(tl.Config(data_path=str(path)))) == text.decode() + f"{EOT}the end"


def test_zstd_frames_cut_anywhere_are_found(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    whole = zstandard.ZstdCompressor(write_checksum=True).compress(b"the cat sat on the mat\n" * 300)
    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    path = tmp_path / "x.zst"
    for data, ends in ((whole, {len(whole)}), (skippable + whole, {len(skippable), len(skippable + whole)})):
        for cut in range(1, len(data) + 1):  # a cut between frames leaves whole frames: nothing to see
            path.write_bytes(data[:cut])
            with open(path, "rb") as f:
                assert td.zstd_cut_short(f) == (cut not in ends), cut


def test_empty_assistant_replies_are_skipped_in_every_layout(tmp_path, capsys):
    empty = {"role": "assistant", "content": ""}
    bad = [{"messages": [QA[0], empty]},
           {"messages": [QA[0], {"role": "assistant", "content": "<|im_end|>"}]},  # control markers only
           {"messages": [*QA, QA[0], empty]},  # one empty reply among good ones
           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]},
           {"instruction": "Say nothing", "input": "", "output": ""}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": QA}, *bad])
    corpus = tl.load_corpus(tl.Config(data_path=str(path)))
    assert corpus.documents == 1
    assert f"skipped 5 of 6 lines of {path} (an empty assistant reply): lines 2, 3, 4, ..." in \
        capsys.readouterr().out
    with pytest.raises(tl.TinyLLMError, match="has no usable line: all 5 are an empty assistant reply; "
                                              "fix the conversations"):
        tl.load_corpus(tl.Config(data_path=str(write_jsonl(tmp_path / "bad.jsonl", bad))))
