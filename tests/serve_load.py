"""A bounded load test of --serve (not a pytest test): it starts the server on a free port,
then for 1, 4 and 16 concurrent clients each streams requests back to back and reports the
generated tokens per second over the wall time, and the time from sending a request to its
first text (p50, p95, max).

    python tests/serve_load.py OUT_DIR [SERVE_BATCH] [MAX_TOKENS] [more --serve flags]
"""

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "train_tinyllm.py"
NAMES = ["Tom", "Lily", "a cat", "Ben"]


def start(out: str, batch: int, extra: list[str]) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen([sys.executable, str(SCRIPT), "--serve", "--out_dir", out, "--port", "0",
                               "--serve_batch", str(batch), "--max_new_tokens", "512", *extra],
                              stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if line.startswith("serving "):
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its log flowing
            return server, int(line.split(" at ")[1].split("/ ")[0].rsplit(":", 1)[1])
    raise SystemExit("the server did not start")


def one(port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: seconds to its first text, and the tokens it generated."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.8,
                       "stream_options": {"include_usage": True}})
    start_time = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, tokens, buffer = None, 0, b""
    while chunk := response.read1(65536):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event == b"data: [DONE]":
                continue
            data = json.loads(event[len(b"data: "):])
            if data["choices"] and data["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start_time
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    conn.close()
    return first if first is not None else time.perf_counter() - start_time, tokens


def load(port: int, clients: int, rounds: int, max_tokens: int) -> dict[str, float]:
    firsts, tokens, lock = [], [], threading.Lock()

    def client(i: int) -> None:
        for k in range(rounds):
            t, n = one(port, f"Once upon a time, {NAMES[(i + k) % len(NAMES)]}", max_tokens)
            with lock:
                firsts.append(t)
                tokens.append(n)
    warm = [threading.Thread(target=one, args=(port, "warm up", 16)) for _ in range(clients)]
    for threads in (warm, [threading.Thread(target=client, args=(i,)) for i in range(clients)]):
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - began
    p95 = statistics.quantiles(firsts, n=20, method="inclusive")[18]
    return {"clients": clients, "requests": len(firsts), "tokens": sum(tokens), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "first_token_p50_ms": round(statistics.median(firsts) * 1000, 1),
            "first_token_p95_ms": round(p95 * 1000, 1), "first_token_max_ms": round(max(firsts) * 1000, 1)}


if __name__ == "__main__":
    out = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    server, port = start(out, batch, sys.argv[4:])
    try:
        for clients in (1, 4, 16):
            result = load(port, clients, 4 if clients < 16 else 2, max_tokens)
            print(json.dumps({"serve_batch": batch, **result}), flush=True)
    finally:
        server.terminate()
        server.wait()
