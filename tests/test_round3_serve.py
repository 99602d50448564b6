"""--chat and --serve, round 3 (issue 26): bytes that are not UTF-8 refused in one line for BPE
models too, the Bearer scheme in any case, CRLF prompts read as training read the corpus,
max_tokens capped by the context (not by --max_new_tokens), messages that name only what is
wrong, unknown /commands not sent to the model, and an out-of-vocabulary 400 an API client can act on."""

import io
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import TINY, client, make_corpus, oracle, raw, serving, sharpen, tl, ts

openai = pytest.importorskip("openai", reason="the openai client is in requirements-dev.txt")

SMALL = [*TINY, "--block_size", "64", "--n_embd", "48", "--dtype", "float32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A char-level model of plain text (no chat template; weights sharpened so that greedy
    decoding runs to the end of the context) and a BPE chat model (ChatML, on conversations)."""
    folder = tmp_path_factory.mktemp("round3")
    rng = random.Random(0)
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as f:
        for _ in range(200):
            question = " ".join(rng.choice(["cat", "dog", "sun", "hat"]) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": question[::-1]}]}) + "\n")
    bpe = ["--tokenizer", "bpe", "--bpe_vocab_size", "300"]
    for name, data, extra in (("text", make_corpus(folder / "corpus.txt"), []),
                              ("bpe", folder / "chat.jsonl", bpe)):
        assert tl.main(["--data_path", str(data), "--out_dir", str(folder / name),
                        "--cache_dir", str(folder / "cache"), *SMALL, *extra]) == 0
    for path in (folder / "text").glob("ckpt*.pt"):
        sharpen(path)
    return folder



def chat_piped(out: Path, data: bytes, monkeypatch, capsys, *flags: str) -> tuple[int, list[str], str]:
    """--chat with `data` on stdin, decoded strictly (as in a UTF-8 locale other than C.UTF-8):
    the exit status, the lines of stdout and stderr."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="strict"))
    capsys.readouterr()
    status = tl.main(["--chat", "--out_dir", str(out), "--temperature", "0", "--max_new_tokens", "6", *flags])
    captured = capsys.readouterr()
    return status, captured.out.split("\n")[:-1], captured.err


def escaped(reply: str) -> str:
    return reply.replace("\\", "\\\\").replace("\n", "\\n")


# ---- 1: bytes that are not UTF-8, BPE models ---------------------------------------------------

def test_bytes_that_are_not_utf8_on_piped_stdin_refuse_that_message_only(models, monkeypatch, capsys):
    """A BPE model: a line of bytes that are not UTF-8 is refused like a message with an unknown
    character (an empty line, the reason on stderr in one line); so is such a /system; the chat
    goes on, the refused message not part of it."""
    data = b"\xff\xfe bad\ncat\n/system \xffx\ncat\n"
    status, lines, err = chat_piped(models / "bpe", data, monkeypatch, capsys)
    assert status == 0 and len(lines) == 3 and lines[0] == "", (lines, err)
    assert "the message is not UTF-8 text (byte 0xff at character 0); give it as UTF-8" in err
    assert "/system is not UTF-8 text (byte 0xff at character 0)" in err and "Traceback" not in err
    use = tl.load_for_use(tl.resolve(["--chat", "--out_dir", str(models / "bpe"), "--device", "cpu"]))
    first, _ = ts.ChatSession(use).reply("cat", tl.SampleSettings(max_new_tokens=6, temperature=0.0),
                                         torch.Generator())
    assert lines[1] == escaped(first)  # as if the refused line had never come
    assert tl.main(["--chat", "--out_dir", str(models / "bpe"), "--system", "be \udcff"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --system is not UTF-8 text (byte 0xff at character 3); give it as UTF-8"]


def test_a_bpe_server_refuses_text_that_is_no_utf8_with_a_400(models):
    with serving(models / "bpe") as server:
        good = {"prompt": "cat", "max_tokens": 2}
        hello = [{"role": "user", "content": "cat"}]
        for path, body, param in (
                ("/v1/completions", {**good, "prompt": "cat \udcff"}, "prompt"),
                ("/v1/completions", {**good, "prompt": ["cat", "\ud800"]}, "prompt"),
                ("/v1/completions", {**good, "stop": ["\udcff"]}, "stop"),
                ("/v1/chat/completions", {"messages": [{"role": "system", "content": "\udcffx"}, *hello]},
                 "messages"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                    {"type": "text", "text": "a\udcff"}]}]}, "messages")):
            status, answer = raw(server, "POST", path, json.dumps(body).encode())
            assert (status, answer["error"]["param"]) == (400, param), (body, answer)
        assert raw(server, "POST", "/v1/completions", b'{"prompt": "\xff"}')[0] == 400  # raw bytes
        reply = client(server).chat.completions.create(model="bpe", messages=hello, max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


# ---- 10: the Bearer scheme is case-insensitive ---------------------------------------------------

def test_the_bearer_scheme_is_read_in_any_case(models):
    with serving(models / "text", "--api_key", "s3cret") as server:
        for header, status in (("bearer s3cret", 200), ("BEARER  s3cret", 200), ("Bearer s3cret", 200),
                               ("bearer wrong", 401), ("Basic s3cret", 401), ("s3cret", 401),
                               ("bearer", 401), ("bearers3cret", 401)):
            got, answer = raw(server, "GET", "/v1/models", headers={"Authorization": header})
            assert got == status, (header, answer)
        assert ts.bearer_token("bEaReR key ") == "key" and ts.bearer_token("Token key") == ""


# ---- 11: CRLF and a byte-order mark, read as training read the corpus ---------------------------

def test_crlf_and_a_bom_in_prompts_read_as_training_read_the_corpus(models):
    with serving(models / "text") as server:
        tok = server.served.engine.tok
        expected, _ = oracle(server, tok.encode("the cat\nsat on"), 5)
        api = client(server)
        for prompt in ("the cat\r\nsat on", "\ufeffthe cat\r\nsat on"):
            done = api.completions.create(model="text", prompt=prompt, temperature=0, max_tokens=5)
            assert done.choices[0].text == expected, prompt
        expected, _ = oracle(server, tok.encode("the cat\r\nsat\n\non".replace("\r\n", "\n")), 5)
        reply = api.chat.completions.create(model="text", temperature=0, max_tokens=5, messages=[
            {"role": "system", "content": "the cat\r\nsat"}, {"role": "user", "content": "on"}])
        assert reply.choices[0].message.content == expected
    assert ts.as_trained("\ufeffa\r\nb\r", tl.Config()) == "a\nb\r"
    assert ts.as_trained("\ufeffa\r\nb", tl.Config(raw_text=True)) == "\ufeffa\r\nb"  # byte for byte


# ---- 13: max_tokens is capped by the context; --max_new_tokens is the default --------------------

def test_max_tokens_is_capped_by_the_context_not_by_max_new_tokens(models):
    with serving(models / "text", "--max_new_tokens", "4") as server:
        tok, capacity = server.served.engine.tok, server.served.engine.capacity
        prompt = tok.encode("the")
        api = client(server)
        expected, new = oracle(server, prompt, 30)
        assert len(new) == 30  # the sharpened model runs on: the cap is what is tested
        done = api.completions.create(model="text", prompt="the", temperature=0, max_tokens=30)
        assert (done.choices[0].text, done.usage.completion_tokens) == (expected, 30)
        default = api.completions.create(model="text", prompt="the", temperature=0)
        assert (default.choices[0].text, default.usage.completion_tokens) == (oracle(server, prompt, 4)[0], 4)
        whole = api.completions.create(model="text", prompt="the", temperature=0, max_tokens=10 ** 6)
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.prompt_tokens + whole.usage.completion_tokens == capacity  # ends with the context
        card = api.models.retrieve("text").model_dump()
        assert (card["context_length"], card["default_max_tokens"]) == (capacity, 4)
        listed = raw(server, "GET", "/v1/models")[1]["data"][0]
        assert (listed["context_length"], listed["default_max_tokens"]) == (capacity, 4)
        health = raw(server, "GET", "/health")[1]
        assert (health["context"], health["max_tokens"]) == (capacity, 4)


# ---- 18: messages that name only what is wrong; unknown commands; a 400 an API client can act on --

@pytest.mark.parametrize("mode", ["--serve", "--chat"])
def test_a_refusal_names_only_the_setting_that_is_wrong(models, capsys, mode):
    out = str(models / ("text" if mode == "--serve" else "bpe"))
    assert tl.main([mode, "--out_dir", out, "--max_new_tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max_new_tokens is 0" in err and "kv_cache" not in err and len(err.splitlines()) == 1, err
    assert tl.main([mode, "--out_dir", out, "--no-kv_cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert "drop --no-kv_cache" in err and "--max_new_tokens" not in err and len(err.splitlines()) == 1, err
    assert tl.main([mode, "--out_dir", out, "--no-kv_cache", "--max_new_tokens", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "drop --no-kv_cache" in err and "--max_new_tokens is 0" in err and len(err.splitlines()) == 1


def test_an_unknown_command_is_not_sent_to_the_model(models, monkeypatch, capsys):
    sent: list[str] = []
    reply = ts.ChatSession.reply
    monkeypatch.setattr(ts.ChatSession, "reply", lambda self, text, *a, **k: sent.append(text) or reply(
        self, text, *a, **k))
    status, lines, err = chat_piped(models / "bpe", b"/unknowncmd\ncat\n//cat\n/reset\n", monkeypatch, capsys)
    assert status == 0 and sent == ["cat", "/cat"]  # // sends a message that begins with /
    assert len(lines) == 3 and lines[0] == "", lines  # piped: an empty line, as for a refused message
    assert "/unknowncmd is no command, and nothing was sent: /reset starts over" in err


def test_an_unknown_character_is_a_400_that_says_what_to_remove(models):
    with serving(models / "text") as server:
        for path, body, param, name in (
                ("/v1/completions", {"prompt": "sat ~", "max_tokens": 2}, "prompt", "the prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"},
                                                       {"role": "user", "content": "sat ~"}]},
                 "messages", "messages[1]")):
            status, answer = raw(server, "POST", path, json.dumps(body).encode())
            message = answer["error"]["message"]
            assert (status, answer["error"]["param"]) == (400, param), answer
            assert message.startswith(f"{name} has 1 character(s) that this model cannot read ('~'"), message
            assert "remove them" in message and "train" not in message.replace("trained on", "")
