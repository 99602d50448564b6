"""--serve: the OpenAI-compatible API, checked with the official openai client, its concurrency
(batched rows against the plain uncached decoding oracle), bad input, and the command line."""

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.request import urlopen

import pytest
import torch
from conftest import TINY, client, make_corpus, oracle, raw, sharpen, td, tl, ts
from conftest import serving as serve_run

openai = pytest.importorskip("openai", reason="the openai client is in requirements-dev.txt")

SCRIPT = Path(__file__).resolve().parents[1] / "train_tinyllm.py"
SMALL = [*TINY, "--block_size", "64", "--n_embd", "48", "--dtype", "float32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A chat model (ChatML, trained a few steps on conversations) and a plain text model."""
    folder = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as f:
        for _ in range(200):
            question = " ".join(rng.choice(["cat", "dog", "sun", "hat"]) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": question[::-1]}]}) + "\n")
    for name, data in (("chat", folder / "chat.jsonl"), ("text", make_corpus(folder / "corpus.txt"))):
        assert tl.main(["--data_path", str(data), "--out_dir", str(folder / name),
                        "--cache_dir", str(folder / "cache"), *SMALL]) == 0
        for path in (folder / name).glob("ckpt*.pt"):
            sharpen(path)
    return folder



def serving(out: Path, *flags: str):
    return serve_run(out, "--max_new_tokens", "64", *flags)


def chat_oracle(server, text: str, max_tokens: int) -> tuple[str, list[int], list[int]]:
    tok = server.served.engine.tok
    prompt = td.chat_prompt(tok, server.served.template, [{"role": "user", "content": text}])
    reply, new = oracle(server, prompt, max_tokens, tuple(tok.end_ids))
    return reply, prompt, new


def text_oracle(server, text: str, max_tokens: int) -> tuple[str, list[int], list[int]]:
    tok = server.served.engine.tok
    prompt = tok.encode(text)
    reply, new = oracle(server, prompt, max_tokens, tuple(tok.end_ids))
    return reply, prompt, new


def test_the_openai_client_chats_completes_and_streams_as_our_decoding_does(models):
    with serving(models / "chat") as server:
        api = client(server)
        assert [m.id for m in api.models.list()] == ["chat"]
        expected, prompt, new = chat_oracle(server, "cat dog", 12)
        reply = api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "cat dog"}],
                                            temperature=0, max_tokens=12)
        assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason == ("length" if len(new) == 12 else "stop")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(new))
        chunks = list(api.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "cat dog"}], temperature=0, max_tokens=12,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)

        expected, prompt, new = text_oracle(server, "sun hat", 10)
        done = api.completions.create(model="chat", prompt="sun hat", temperature=0, max_tokens=10)
        assert done.choices[0].text == expected and done.usage.prompt_tokens == len(prompt)
        streamed = api.completions.create(model="chat", prompt="sun hat", temperature=0, max_tokens=10,
                                          stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_a_model_without_a_chat_template_continues_the_messages_as_text(models):
    with serving(models / "text") as server:
        assert server.served.template == ""
        expected, _, _ = text_oracle(server, "the cat\n\nsat on", 8)
        reply = client(server).chat.completions.create(
            model="text", temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": "the cat"}, {"role": "user", "content": "sat on"}])
        assert reply.choices[0].message.content == expected


def test_concurrent_clients_each_get_their_own_reply(models):
    """More clients than rows: rows at different positions decode in one batch, the rest wait;
    every reply equals what the request would get alone."""
    with serving(models / "chat", "--serve_batch", "3") as server:
        api = client(server)
        rng = random.Random(1)
        jobs = [(" ".join(rng.choice(["cat", "dog", "sun", "hat"]) for _ in range(rng.randint(1, 6))),
                 rng.randint(3, 20), i % 2 == 0) for i in range(10)]
        results: dict[int, str] = {}
        widths: list[int] = []
        advance = server.served.engine.advance

        def counted() -> None:
            widths.append(len(server.served.engine.rows))
            advance()
        server.served.engine.advance = counted

        def ask(i: int, text: str, max_tokens: int, stream: bool) -> None:
            messages = [{"role": "user", "content": text}]
            if stream:
                chunks = api.chat.completions.create(model="chat", messages=messages, temperature=0,
                                                     max_tokens=max_tokens, stream=True)
                results[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
            else:
                results[i] = api.chat.completions.create(model="chat", messages=messages, temperature=0,
                                                         max_tokens=max_tokens).choices[0].message.content
        threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == len(jobs)
        for i, (text, max_tokens, _) in enumerate(jobs):
            assert results[i] == chat_oracle(server, text, max_tokens)[0], jobs[i]
        assert server.served.engine.rows == []  # every row was freed
        assert max(widths) == 3  # rows were decoded together, and no more than --serve_batch


def test_seed_n_and_stop_strings(models):
    with serving(models / "text") as server:
        api = client(server)
        sampled = {"model": "text", "prompt": "the", "n": 3, "seed": 7, "temperature": 1.0, "max_tokens": 12}
        first, again = api.completions.create(**sampled), api.completions.create(**sampled)
        texts = [c.text for c in first.choices]
        assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
        assert [c.index for c in first.choices] == [0, 1, 2]
        if all(c.finish_reason == "length" for c in first.choices):
            assert first.usage.completion_tokens == 3 * 12
        greedy, _, _ = text_oracle(server, "the", 30)
        nucleus = api.completions.create(model="text", prompt="the", temperature=1.0, top_p=0, max_tokens=30)
        assert nucleus.choices[0].text == greedy  # top_p 0 keeps the most likely token alone
        stop = greedy[10:13]
        cut = greedy[:greedy.index(stop)]
        done = api.completions.create(model="text", prompt="the", temperature=0, max_tokens=30, stop=[stop])
        assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
        streamed = api.completions.create(model="text", prompt="the", temperature=0, max_tokens=30, stop=stop,
                                          stream=True)
        assert "".join(c.choices[0].text for c in streamed) == cut


def plain_logprobs(server, ids: list[int]) -> torch.Tensor:
    """(T - 1, V) log-probabilities of each next token by the uncached forward pass (the oracle)."""
    model = server.served.engine.model
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), -1)


def test_completions_give_logprobs_of_the_reply_and_echo_the_prompts_own(models):
    with serving(models / "text") as server:
        tok = server.served.engine.tok
        api = client(server)
        done = api.completions.create(model="text", prompt="the cat", max_tokens=6, temperature=0,
                                      logprobs=3)
        prompt = tok.encode("the cat")
        reply = tok.encode(done.choices[0].text)
        lp = done.choices[0].logprobs
        want = plain_logprobs(server, prompt + reply)
        assert lp.tokens == [tok.decode([i]) for i in reply] and len(lp.top_logprobs) == len(reply)
        for t, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
            row = want[len(prompt) + t - 1]
            assert value == pytest.approx(row[reply[t]].item(), abs=1e-4)
            assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy: the top
        echoed = api.completions.create(model="text", prompt="the cat sat", max_tokens=0, echo=True,
                                        logprobs=1)
        ids = tok.encode("the cat sat")
        e = echoed.choices[0]
        assert e.text == "the cat sat" and e.finish_reason == "length" and echoed.usage.completion_tokens == 0
        assert e.logprobs.token_logprobs[0] is None and e.logprobs.top_logprobs[0] is None
        want = plain_logprobs(server, ids)
        assert e.logprobs.token_logprobs[1:] == pytest.approx([want[t - 1, ids[t]].item()
                                                               for t in range(1, len(ids))], abs=1e-4)
        assert e.logprobs.text_offset == [len(tok.decode(ids[:t])) for t in range(len(ids))]
        plain = api.completions.create(model="text", prompt="the", max_tokens=3, temperature=0)
        assert plain.choices[0].logprobs is None


def test_chat_gives_logprobs_and_top_logprobs_of_the_reply(models):
    with serving(models / "chat") as server:
        tok = server.served.engine.tok
        api = client(server)
        done = api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "cat dog"}],
                                           max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
        _, prompt, new = chat_oracle(server, "cat dog", 8)
        content = done.choices[0].logprobs.content
        generated = [i for i in new if i not in tok.end_ids] or new
        assert [c.token for c in content][:len(generated)] == [tok.decode([i]) for i in generated]
        want = plain_logprobs(server, prompt + new)
        for t, c in enumerate(content[:len(generated)]):
            assert c.logprob == pytest.approx(want[len(prompt) + t - 1, new[t]].item(), abs=1e-4)
            assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
            assert c.bytes == list(c.token.encode())
        got, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "cat"}], "top_logprobs": 2}).encode())
        assert got == 400 and answer["error"]["param"] == "top_logprobs"
        got, answer = raw(server, "POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "cat"}], "max_tokens": 0}).encode())
        assert got == 400 and answer["error"]["param"] == "max_tokens"


def chat_body(*messages: dict) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(models):
    with serving(models / "chat", "--max_new_tokens", "20") as server:
        good = {"prompt": "cat", "max_tokens": 3}
        long_prompt = "cat dog " * 40
        cases = [
            ("POST", "/v1/completions", b"{not json", 400, None),
            ("POST", "/v1/completions", b"[1, 2]", 400, None),
            ("POST", "/v1/completions", json.dumps({**good, "max_tokens": "3"}).encode(), 400, "max_tokens"),
            ("POST", "/v1/completions", json.dumps({**good, "temperature": 3}).encode(), 400, "temperature"),
            ("POST", "/v1/completions", json.dumps({**good, "stream": "yes"}).encode(), 400, "stream"),
            ("POST", "/v1/completions", json.dumps({**good, "model": "gpt-4o"}).encode(), 404, "model"),
            ("POST", "/v1/completions", json.dumps({**good, "max_tokens": -1}).encode(), 400, "max_tokens"),
            ("POST", "/v1/completions", json.dumps({**good, "n": 17}).encode(), 400, "n"),
            ("POST", "/v1/completions", json.dumps({**good, "logprobs": 21}).encode(), 400, "logprobs"),
            ("POST", "/v1/completions", json.dumps({**good, "echo": 1}).encode(), 400, "echo"),
            ("POST", "/v1/completions", json.dumps({**good, "logprobs": 1, "stream": True}).encode(), 400,
             "stream"),
            ("POST", "/v1/completions", json.dumps({**good, "colour": "red"}).encode(), 400, "colour"),
            ("POST", "/v1/completions", json.dumps({**good, "stop": ["a"] * 5}).encode(), 400, "stop"),
            ("POST", "/v1/completions", json.dumps({"prompt": long_prompt}).encode(), 400, "prompt"),
            ("POST", "/v1/completions", json.dumps({"prompt": [10 ** 9]}).encode(), 400, "prompt"),
            ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
            ("POST", "/v1/chat/completions", chat_body({"role": "tool", "content": "x"}), 400, "messages"),
            ("POST", "/v1/chat/completions", chat_body({"role": "user", "content": 5}), 400, "messages"),
            ("POST", "/v1/chat/completions",
             chat_body({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}),
             400, "messages"),
            ("GET", "/v1/completions", None, 405, None),
            ("DELETE", "/v1/models", None, 405, None),
            ("OPTIONS", "/v1/chat/completions", None, 405, None),
            ("GET", "/v2/anything", None, 404, None),
            ("GET", "/v1/models/gpt-4o", None, 404, None),
        ]
        for method, path, body, status, param in cases:
            got, answer = raw(server, method, path, body, {"Content-Type": "application/json"})
            assert got == status, (path, body[:80] if body else None, answer)
            assert answer["error"]["message"] and answer["error"]["param"] == param, answer
        host, port = server.http.server_address[:2]
        assert raw(server, "HEAD", "/") == (405, {})  # headers only
        with socket.create_connection((host, port)) as sock:  # a length of 5,000 digits is too big too
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {'9' * 5000}"
                         f"\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        with socket.create_connection((host, port)) as sock:  # a body too big is refused unread
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {ts.MAX_BODY + 1}"
                         f"\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        got, answer = raw(server, "POST", "/v1/completions", json.dumps({"prompt": long_prompt}).encode())
        assert answer["error"]["code"] == "context_length_exceeded"
        assert "nothing is cut" in answer["error"]["message"]
        api = client(server)
        over = api.completions.create(model="chat", prompt="cat", max_tokens=500)  # the context caps it
        assert over.usage.prompt_tokens + over.usage.completion_tokens <= server.served.engine.capacity
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert api.completions.create(model="chat", prompt="cat", max_tokens=3).choices[0].finish_reason
        assert raw(server, "GET", "/health")[1]["status"] == "ok"


def slow_sampling(monkeypatch, seconds: float = 0.02) -> list[int]:
    """Every sampled token takes `seconds` more; returns a list that counts them."""
    calls: list[int] = []
    choose = tl.choose_next

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(seconds)
        return choose(*args, **kwargs)
    monkeypatch.setattr(ts, "choose_next", slow)
    return calls


def wait_until_idle(server, seconds: float = 5.0) -> None:
    deadline = time.time() + seconds
    while server.served.engine.rows or not server.served.engine.waiting.empty():
        assert time.time() < deadline, "the server still decodes for a client that left"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(models, monkeypatch, stream):
    with serving(models / "text", "--max_new_tokens", "1000") as server:
        _, prompt, new = text_oracle(server, "the", 1000)
        assert len(prompt) + len(new) == server.served.engine.capacity  # greedy, it runs to the end
        calls = slow_sampling(monkeypatch, 0.04)
        host, port = server.http.server_address[:2]
        body = json.dumps({"prompt": "the", "max_tokens": 1000, "stream": stream, "temperature": 0}).encode()
        sock = socket.create_connection((host, port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            seen = b""
            while seen.count(b"data: ") < 3:
                chunk = sock.recv(4096)
                assert chunk, seen
                seen += chunk
        else:
            time.sleep(0.1)
        sock.close()
        wait_until_idle(server)
        taken = len(calls)
        assert taken < 30  # 63 tokens fit the context; the request asked for all of them
        time.sleep(0.2)
        assert len(calls) == taken  # nothing more is generated
        assert client(server).completions.create(model="text", prompt="the", max_tokens=2).choices


def test_an_api_key_is_required_when_set(models):
    with serving(models / "text", "--api_key", "s3cret") as server:
        assert raw(server, "GET", "/v1/models")[0] == 401
        status, answer = raw(server, "POST", "/v1/completions", b'{"prompt": "the"}',
                             {"Authorization": "Bearer wrong"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert client(server, "s3cret").completions.create(model="text", prompt="the", max_tokens=2).choices
        assert raw(server, "GET", "/health")[0] == 200
        with urlopen(server.url + "/") as page:
            assert page.status == 200


def test_the_chat_page_is_one_self_contained_file(models):
    with serving(models / "text") as server, urlopen(server.url + "/") as page:
        html = page.read().decode()
        assert page.headers["Content-Type"].startswith("text/html")
    assert "<script" in html and "/v1/chat/completions" in html and 'name="viewport"' in html
    assert "http://" not in html and "https://" not in html and " src=" not in html and "<link" not in html


def test_int8_weights_and_a_safetensors_export_serve(models, tmp_path):
    assert tl.main(["--export", "safetensors", "--out_dir", str(models / "text"), "--export_dir",
                    str(tmp_path / "st")]) == 0
    for flags in (["--quantize", "int8"], ["--ckpt", str(tmp_path / "st" / "model.safetensors")]):
        with serving(models / "text", *flags) as server:
            int8 = any(isinstance(m, ts.Int8Linear) for m in server.served.engine.model.modules())
            assert int8 == ("--quantize" in flags)
            expected, _, _ = text_oracle(server, "the cat", 10)
            done = client(server).completions.create(model=server.served.model_id, prompt="the cat",
                                                     temperature=0, max_tokens=10)
            assert done.choices[0].text == expected


def test_serve_settings_are_refused_where_they_do_not_apply(models, capsys):
    assert tl.main(["--generate_only", "--out_dir", str(models / "text"), "--port", "9000"]) == 2
    assert "--port is for --serve" in capsys.readouterr().err
    assert tl.main(["--serve", "--out_dir", str(models / "text"), "--serve_batch", "0"]) == 2
    assert "--serve_batch 0" in capsys.readouterr().err
    assert tl.main(["--serve", "--chat", "--out_dir", str(models / "text")]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert tl.main(["--serve", "--out_dir", str(models / "text"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def start_process(out: Path, *flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--serve", "--out_dir", str(out), "--port", "0",
                                "--device", "cpu", "--max_new_tokens", "60", *flags],
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("serving "):
            return process, line.split(" at ")[1].split("/ ")[0], lines
    raise AssertionError("".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_command_serves_and_stops_cleanly_on_a_signal(models, signum):
    extra = ["--host", "0.0.0.0"] if signum == signal.SIGTERM else []
    process, url, lines = start_process(models / "text", *extra)
    try:
        if extra:
            assert any("reachable from other machines, and it has no --api_key" in line for line in lines)
            url = url.replace("0.0.0.0", "127.0.0.1")
        else:
            assert url.startswith("http://127.0.0.1:") and not any("warning" in line for line in lines)
        with urlopen(url + "/health") as health:
            assert json.load(health)["model"] == "text"
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = api.completions.create(model="text", prompt="the", max_tokens=60, stream=True)
        next(iter(stream))
        process.send_signal(signum)
        try:  # the stream ends: finished, or told that the server shut down
            list(stream)
        except openai.APIError as e:
            assert "shutting down" in str(e)
        assert process.wait(timeout=30) == 0
        assert "the server stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def browser_and_driver() -> tuple[str, str]:
    """Debian's chromium and chromium-driver (what .ci/run installs), or a Chrome on the path."""
    pytest.importorskip("selenium", reason="selenium is in requirements-dev.txt")
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless browser here: apt-get install chromium chromium-driver (CI installs them)")
    return browser, driver


def open_browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = browser_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_the_chat_page_streams_replies_in_a_real_browser(models, monkeypatch):
    """Headless Chromium at a phone's width: the page sends the conversation, the reply grows as
    it streams and ends as the API's own greedy reply, and a new chat starts empty."""
    browser_and_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    slow_sampling(monkeypatch)  # 20 ms a token: the stream arrives in many pieces
    with serving(models / "chat", "--max_new_tokens", "40") as server:
        page = open_browser(390, 844)
        try:
            wait = WebDriverWait(page, 30)
            page.get(server.url + "/")
            wait.until(lambda p: "chat" in p.find_element(By.ID, "model").text)
            assert page.find_element(By.ID, "max_tokens").get_attribute("value") == "40"
            page.execute_script("document.getElementById('temperature').value = 0;"
                                "document.getElementById('max_tokens').value = 24;"
                                "window.seen = [];"
                                "new MutationObserver(() => {"
                                "  const a = document.querySelectorAll('.assistant');"
                                "  if (a.length) window.seen.push(a[a.length - 1].textContent.length); })"
                                ".observe(document.getElementById('log'),"
                                "         {subtree: true, childList: true, characterData: true});")
            conversation = []
            for text in ("cat dog", "sun"):
                page.find_element(By.ID, "input").send_keys(text + Keys.ENTER)
                wait.until(lambda p: p.find_element(By.ID, "send").text == "Send"
                           and not p.find_elements(By.CSS_SELECTOR, ".assistant.pending"))
                reply = page.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("textContent")
                conversation.append({"role": "user", "content": text})
                tok = server.served.engine.tok
                # as the server reads messages: control markers typed (or replied) in them taken out
                plain = [{**m, "content": td.plain_content(m["content"])} for m in conversation]
                prompt = td.chat_prompt(tok, server.served.template, plain)
                expected, _ = oracle(server, prompt, 24, tuple(tok.end_ids))
                assert reply == expected
                conversation.append({"role": "assistant", "content": reply})
            assert len(set(page.execute_script("return window.seen"))) >= 4  # the reply grew in steps
            assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            if os.environ.get("TINYLLM_SCREENSHOT"):
                page.save_screenshot(os.environ["TINYLLM_SCREENSHOT"])
            page.find_element(By.ID, "new").click()
            assert page.find_elements(By.CSS_SELECTOR, ".msg") == []
        finally:
            page.quit()


def test_hostile_values_are_refused_or_contained(models, monkeypatch):
    """Values that would overflow sampling, seeds or the JSON parser, lone surrogates, stop
    strings too long: each is a 4xx; a choice whose sampling fails anyway ends alone (500)."""
    with serving(models / "text") as server:
        good = {"prompt": "the", "max_tokens": 3}
        for extra, param in (({"repetition_penalty": 1e300}, "repetition_penalty"),
                             ({"seed": 2 ** 70}, "seed"), ({"stop": "x" * 300}, "stop"),
                             ({"prompt": "\ud800"}, "prompt"), ({"top_p": -1}, "top_p")):
            status, answer = raw(server, "POST", "/v1/completions", json.dumps({**good, **extra}).encode())
            assert (status, answer["error"]["param"]) == (400, param), (extra, answer)
        for body in (b'{"prompt": "the", "top_k": 1e400}', b"[" * 100_000, b'{"seed": ' + b"9" * 5000 + b"}"):
            assert raw(server, "POST", "/v1/completions", body)[0] == 400
        surrogate = json.dumps({**good, "model": "\ud800"}).encode()
        status, answer = raw(server, "POST", "/v1/completions", surrogate)
        assert status == 404 and "?" in answer["error"]["message"]
        host, port = server.http.server_address[:2]
        with socket.create_connection((host, port)) as sock:
            sock.sendall("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 411 ")
        with socket.create_connection((host, port)) as sock:  # refused before the body is sent
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                         f"Content-Length: {ts.MAX_BODY + 1}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        expected, _, _ = text_oracle(server, "the", 5)
        tiny = client(server).completions.create(model="text", prompt="the", max_tokens=5, temperature=1e-30)
        assert tiny.choices[0].text == expected  # below 1e-4 a temperature samples greedily

        choose = tl.choose_next

        def fails_for_top_k_7(logits, history, settings, generator):
            if settings.top_k == 7:
                raise RuntimeError("a kernel failed")
            return choose(logits, history, settings, generator)
        monkeypatch.setattr(ts, "choose_next", fails_for_top_k_7)
        status, answer = raw(server, "POST", "/v1/completions", json.dumps({**good, "top_k": 7}).encode())
        assert status == 500 and "a kernel failed" in answer["error"]["message"]
        assert client(server).completions.create(model="text", prompt="the", max_tokens=3).choices
        assert raw(server, "GET", "/health")[1]["status"] == "ok"


def test_a_refused_request_leaves_its_connection_usable(models):
    """A refusal before the body is read (no API key, a wrong path) must not leave the body to be
    read as the next request on a kept-alive connection."""
    with serving(models / "text", "--api_key", "k") as server:
        host, port = server.http.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        body = json.dumps({"prompt": "the", "max_tokens": 2})
        for path, key, status in (("/v1/completions", "wrong", 401), ("/v1/nowhere", "k", 404),
                                  ("/v1/completions", "k", 200)):
            conn.request("POST", path, body, {"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == status and json.loads(response.read())
        conn.close()


def test_stopping_the_server_tells_a_stream_in_flight(models, monkeypatch):
    slow_sampling(monkeypatch)
    with serving(models / "text") as server:
        stream = client(server).completions.create(model="text", prompt="the", max_tokens=60, temperature=0,
                                                   stream=True)  # greedy, it runs to the end of the context
        next(iter(stream))
        threading.Timer(0.1, server.stop).start()
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)


@pytest.mark.slow
def test_a_compiled_decode_step_serves_every_width_with_one_graph(models):
    """--compile_decode steps all --serve_batch rows every time (free rows too), so the number
    of requests in flight never makes torch.compile compile again; replies stay the oracle's."""
    with serving(models / "chat", "--compile_decode", "--serve_batch", "3") as server:
        api = client(server)
        texts = ["cat", "dog sun", "hat hat cat dog", "sun"]
        before = None
        for width in (1, 3, 2):
            results: dict[int, str] = {}

            def ask(i: int, results: dict[int, str] = results) -> None:
                results[i] = api.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": texts[i]}], temperature=0,
                    max_tokens=10).choices[0].message.content
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(width)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            expected = [chat_oracle(server, texts[i], 10)[0] for i in range(width)]
            assert [results[i] for i in range(width)] == expected
            before = tl.compile_count() if before is None else before
        assert tl.compile_count() == before  # the one compile happened before the first reply


def test_a_failing_model_stops_the_server_with_status_2(models, monkeypatch, capsys):
    """When the batched step itself fails, every client is told (500) and --serve exits 2, so
    that a supervisor restarts it; a failure of one request's sampling is the other test's."""
    started: list = []
    start = ts.start_server
    monkeypatch.setattr(ts, "start_server", lambda *a, **k: started.append(start(*a, **k)) or started[-1])
    monkeypatch.setattr(ts.Engine, "advance", lambda self: (_ for _ in ()).throw(RuntimeError("device lost")))
    answers: list = []
    returned = threading.Event()

    def ask() -> None:
        while not started:
            time.sleep(0.01)
        try:
            answers.append(raw(started[0], "POST", "/v1/completions",  # greedy: no end-of-text at once
                               b'{"prompt": "the", "max_tokens": 5, "temperature": 0}'))
        except Exception as e:
            answers.append(e)
        if not returned.wait(20):  # whatever went wrong, the server must not hang the suite
            os.kill(os.getpid(), signal.SIGINT)
    asker = threading.Thread(target=ask)
    asker.start()
    status = tl.main(["--serve", "--out_dir", str(models / "text"), "--port", "0", "--device", "cpu"])
    returned.set()
    asker.join(30)
    assert status == 2, answers
    assert answers[0][0] == 500 and "device lost" in answers[0][1]["error"]["message"]
    assert "error: generation failed (device lost); the server stopped" in capsys.readouterr().err
