"""Serving speed of SmolLM2-135M on this CPU: `zhjax serve` vs `transformers serve`, the same model dir, fp32 both.

    .venv/bin/python bench/serve.py [--model assets/smollm2-135m] [--concurrency 1 8 32] [--new-tokens 64]

Both servers are started as their users start them (on 127.0.0.1, free ports) and stay up for the whole run;
for each concurrency level, `c` clients each send `--rounds` streamed chat requests (greedy, up to `--new-tokens`
tokens, the official openai client), zhjax then transformers then zhjax ... (`--repeats` pairs), so both see
the same machine load. Per run: output tokens/s (all answers' tokens, counted with the tokenizer, over the
wall time of the run) and the median time to first token. The medians over the repeats are printed as a
Markdown table. An idle server uses no CPU, so the two do not slow each other down.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = [
    "请介绍一下长城的历史。", "What is the capital of France? Explain its history.", "写一首关于春天的诗。",
    "Explain how a transformer language model works.", "北京有哪些著名的景点？", "List five uses of Python.",
    "为什么天空是蓝色的？", "Tell me a short story about a cat.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc: subprocess.Popen, path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"no server on port {port} after {timeout} s")


def one_request(client, model: str, question: str, new_tokens: int, tokenizer) -> tuple[int, float]:
    start = time.perf_counter()
    first, text = None, ""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=new_tokens, temperature=0, stream=True)
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first or time.perf_counter() - start
            text += piece
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]), first or float("nan")


def run(client, model: str, concurrency: int, rounds: int, new_tokens: int, tokenizer) -> tuple[float, float]:
    jobs = [QUESTIONS[(i + r) % len(QUESTIONS)] for i in range(concurrency) for r in range(rounds)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda q: one_request(client, model, q, new_tokens, tokenizer), jobs))
    wall = time.perf_counter() - start
    return sum(n for n, _ in results) / wall, statistics.median(t for _, t in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/smollm2-135m")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="requests each client sends, one after another")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8, help="zhjax serve --max-batch")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of transformers serve (with other jobs on the cores, torch's spinning "
                             "threads make it erratic)")
    args = parser.parse_args()

    import openai
    import transformers

    model = str(Path(args.model).resolve())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    zport, tport = free_port(), free_port()
    procs = {
        "zhjax": subprocess.Popen(
            [sys.executable, "-m", "zhjax.cli", "serve", "--model", model, "--port", str(zport), "--model-name",
             model, "--max-batch", str(args.max_batch), "--max-seq-len", "512"],
            stdout=open(logs / "zhjax.log", "w"), stderr=subprocess.STDOUT),
        "transformers": subprocess.Popen(
            [str(Path(sys.executable).with_name("transformers")), "serve", model, "--port", str(tport),
             "--host", "127.0.0.1", "--dtype", "float32"],
            stdout=open(logs / "transformers.log", "w"), stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(args.torch_threads)}),
    }
    try:
        wait_up(zport, procs["zhjax"], "/health")
        wait_up(tport, procs["transformers"], "/v1/models")
        clients = {name: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=600,
                                       max_retries=0) for name, port in (("zhjax", zport), ("transformers", tport))}
        for client in clients.values():  # warm both (compiles, first-call setup)
            run(client, model, 2, 1, 8, tokenizer)
        rows = []
        for c in args.concurrency:
            results: dict[str, list[tuple[float, float]]] = {"zhjax": [], "transformers": []}
            for _ in range(args.repeats):
                for name in ("zhjax", "transformers"):
                    results[name].append(run(clients[name], model, c, args.rounds, args.new_tokens, tokenizer))
                    print(f"c={c} {name}: {results[name][-1][0]:.1f} tok/s, ttft {results[name][-1][1]:.2f} s",
                          file=sys.stderr, flush=True)
            med = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                   for n, v in results.items()}
            rows.append((c, med["zhjax"], med["transformers"]))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\nSmolLM2-135M fp32, {args.new_tokens} new tokens per request (greedy, EOS allowed), "
          f"zhjax --max-batch {args.max_batch}, transformers with {args.torch_threads} torch thread(s), medians of {args.repeats} interleaved runs\n")
    print("| concurrency | zhjax tok/s | transformers tok/s | ratio | zhjax TTFT s | transformers TTFT s |")
    print("|---|---|---|---|---|---|")
    for c, (zt, zf), (tt, tf) in rows:
        print(f"| {c} | {zt:.1f} | {tt:.1f} | {zt / tt:.2f}x | {zf:.2f} | {tf:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
