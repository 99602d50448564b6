"""Shared fixtures: tiny corpora made on the fly and a helper that runs main() in-process."""

import contextlib
import http.client
import json
import sys
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and pytest may share the cores with a
# subprocess run: one thread each avoids OpenMP oversubscription stalls.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinyllm_data as td  # noqa: E402, F401  (tests import them from here: the card and its siblings)
import tinyllm_evals as te  # noqa: E402, F401
import tinyllm_hub as th  # noqa: E402, F401
import tinyllm_serve as ts  # noqa: E402, F401
import tinyllm_tune as tt  # noqa: E402, F401
import train_tinyllm as tl  # noqa: E402, F401

# A tiny config: 2 layers, 32 wide, a few steps; every test that trains starts from this.
TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "16",
        "--batch_size", "4", "--max_steps", "6", "--eval_interval", "3", "--eval_iters", "2",
        "--log_interval", "1", "--sample_interval", "0", "--max_new_tokens", "8",
        "--warmup_steps", "2", "--device", "cpu", "--peak_flops", "1e11", "--no-compile_decode"]


def make_corpus(path: Path, n_lines: int = 400) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "Ünïcode", "日本"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sharpen(path: Path) -> None:
    """Random weights in a checkpoint, large enough that every token's logits depend on the whole
    context: a reply decoded from another row's cache, or at another position, comes out
    different (six steps of training leave a model that predicts nearly the same after anything)."""
    ckpt = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for w in ckpt["model"].values():
        if w.dim() == 2:
            w.copy_(torch.randn(w.shape, generator=generator) * 1.5 / w.size(1) ** 0.5)
    torch.save(ckpt, path)


@contextlib.contextmanager
def serving(out: Path, *flags: str):
    """--serve of the run in `out` on a free port, in this process, stopped on the way out."""
    r = tl.resolve(["--serve", "--out_dir", str(out), "--port", "0", "--device", "cpu", *flags])
    server = ts.start_server(tl.load_for_use(r))
    try:
        yield server
    finally:
        server.stop()


def client(server, key: str = "none"):
    """The official openai client on the server (imported here: tests that use it importorskip it)."""
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None
        ) -> tuple[int, dict]:
    """A request as bytes, past any client: the status and the JSON body."""
    host, port = server.http.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data) if data else {}


def oracle(server, prompt: list[int], max_tokens: int, stop_ids: tuple[int, ...] | None = None
           ) -> tuple[str, list[int]]:
    """Greedy decoding through the plain uncached forward pass, one request alone; it stops where
    every mode stops (the tokenizer's end_ids) unless told otherwise."""
    engine = server.served.engine
    stop_ids = engine.tok.end_ids if stop_ids is None else stop_ids
    idx = torch.tensor([prompt])
    new: list[int] = []
    with torch.no_grad():
        while len(new) < max_tokens and idx.size(1) < engine.capacity:
            token = int(tl.next_logits_uncached(engine.model, idx).argmax(-1))
            if token in stop_ids:
                break
            new.append(token)
            idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
    return tl.reply_text(engine.tok, prompt, new), new


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def run_args(tmp_path: Path, corpus: Path):
    """Build argv for a tiny run writing under tmp_path."""
    def build(*extra: str, out: str = "out") -> list[str]:
        return ["--data_path", str(corpus), "--out_dir", str(tmp_path / out),
                "--cache_dir", str(tmp_path / "cache"), *TINY, *extra]
    return build
