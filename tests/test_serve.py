"""`zhjax serve`: the OpenAI client against a live server on 127.0.0.1 (tiny random model over SmolLM2's tokenizer),
continuous batching that changes no answer, no compiles once warm, bounded load, errors with their status, a
disconnect that frees its slot, and the chat page."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import zhjax  # noqa: E402
from zhjax.config import ModelConfig  # noqa: E402
from zhjax.infer.batcher import Batcher, Request  # noqa: E402
from zhjax.infer.chat import build_prompt  # noqa: E402
from zhjax.infer.generate import Decoder, generate, generate_ids  # noqa: E402
from zhjax.infer.serve import Settings, build_server, create_app  # noqa: E402
from zhjax.model.llama import LlamaForCausalLM  # noqa: E402

MAX_SEQ_LEN = 256
PROMPTS = [f"第{i}个问题：what is {i} + {i}?" + " 请回答。" * (i % 5) for i in range(64)]


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MAX_SEQ_LEN, tie_word_embeddings=True,
                bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_decoder():
    return Decoder(LlamaForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def live(assets, tiny_decoder):
    """A server on a free port of 127.0.0.1, in this process: `(base_url, server, tokenizer)`."""
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    server = build_server(tiny_decoder, tok, Settings("tiny", "chat"), max_batch=8, max_seq_len=MAX_SEQ_LEN)
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not web.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = web.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", server, tok
    web.should_exit = True
    thread.join(timeout=30)
    server.batcher.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", timeout=120, max_retries=0)


def post(base: str, path: str, body, *, raw: bytes | None = None) -> tuple[int, dict, dict]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(text)


def greedy_completion(client, prompt: str, n: int = 12) -> str:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0).choices[0].text


# ------------------------------------------------------------------------------------------- the OpenAI client


def test_openai_client_completion_streamed_equals_whole_with_usage(client, live):
    tok = live[2]
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(tok(PROMPTS[1])["input_ids"])
    assert whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 20
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) > 0
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did stream
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_openai_client_chat_streamed_equals_whole(client, live):
    messages = [{"role": "user", "content": "你好！介绍一下长城。"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content
    tok = live[2]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert whole.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert client.models.list().data[0].id == "tiny"


def test_stop_string_cuts_the_answer_streamed_or_not(client):
    full = greedy_completion(client, PROMPTS[2], 24)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    expected = full[: full.index(stop)]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_omitted_settings_are_the_seeds_defaults(client):
    seeds = {"prompt": PROMPTS[3], "max_tokens": 16, "seed": 7}
    default = client.completions.create(model="tiny", **seeds).choices[0].text
    explicit = client.completions.create(model="tiny", temperature=0.2, top_p=0.9, **seeds,
                                         extra_body={"top_k": 40, "repetition_penalty": 1.1}).choices[0].text
    other = client.completions.create(model="tiny", temperature=1.5, top_p=1.0, **seeds,
                                      extra_body={"top_k": 0, "repetition_penalty": 1.0}).choices[0].text
    assert default == explicit
    assert default != other  # the settings are not ignored


# ------------------------------------------------------------------------------------------- batching


def run_alone(batcher: Batcher, ids: list[int], n: int, **kw) -> tuple[list[int], str]:
    out, done = [], threading.Event()
    reason = []

    def sink(new, why):
        out.extend(new)
        if why:
            reason.append(why)
            done.set()

    batcher.submit(Request(ids, n, sink, **kw))
    assert done.wait(120)
    return out, reason[0]


def run_together(batcher: Batcher, jobs: list[tuple[list[int], dict]], n: int) -> list[list[int]]:
    outs = [[] for _ in jobs]
    events = [threading.Event() for _ in jobs]
    for i, (ids, kw) in enumerate(jobs):
        def sink(new, why, i=i):
            outs[i].extend(new)
            if why:
                events[i].set()
        batcher.submit(Request(ids, n, sink, **kw))
    assert all(e.wait(120) for e in events)
    return outs


def test_a_request_gets_the_same_tokens_alone_or_beside_seven_others(live, tiny_decoder):
    batcher = live[1].batcher  # 8 slots, already compiled
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 49152, size=rng.integers(1, 60))] for _ in range(8)]
    greedy = dict(greedy=True, repetition_penalty=1.3)
    together = run_together(batcher, [(p, greedy) for p in prompts], 24)
    alone = [run_alone(batcher, p, 24, **greedy)[0] for p in prompts]
    assert together == alone
    # and they are the tokens of the one-batch decoder (which tests/test_generate.py holds to transformers)
    assert alone == generate_ids(tiny_decoder, prompts, max_new_tokens=24, greedy=True, repetition_penalty=1.3,
                                 eos_token_id=batcher.eos_ids)
    # a seeded sampled row beside neighbours whose top_k=0 sends the step down the whole-vocabulary path
    sampled = dict(seed=11, temperature=0.8, top_k=40, top_p=0.9)
    mixed = run_together(batcher, [(prompts[0], sampled)] + [(p, dict(seed=1, top_k=0)) for p in prompts[1:]], 24)
    assert mixed[0] == run_alone(batcher, prompts[0], 24, **sampled)[0]


class CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.compiled: list[str] = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.compiled.append(record.getMessage().split(" with ")[0])


def test_no_compilation_per_request_once_warm(client):
    def round_of_requests():
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: client.completions.create(
                model="tiny", prompt=p, max_tokens=8, seed=3, extra_body={"top_k": 20}), PROMPTS[:8]))

    round_of_requests()  # warm: the prompt buckets these lengths use
    handler = CompileLog()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            round_of_requests()
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert handler.compiled == []


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_load_64_requests_from_16_clients_all_answered_as_if_alone(client, live):
    alone = {p: greedy_completion(client, p) for p in PROMPTS}
    sizes = []
    for _ in range(3):
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda p: greedy_completion(client, p), PROMPTS))
        assert time.monotonic() - started < 300
        assert answers == [alone[p] for p in PROMPTS]
        sizes.append(rss_mb())
    assert live[1].batcher.active == 0 and live[1].batcher.queued == 0
    assert sizes[2] - sizes[0] < 50, f"resident memory grew across rounds: {sizes} MB"


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, raw, status, names", [
    (None, b'{"model": "tiny", "prompt": "hi"', 400, "JSON"),
    (None, b'[1, 2]', 400, "object"),
    ({"model": "gpt-4", "prompt": "hi"}, None, 404, "gpt-4"),
    ({"model": "tiny", "prompt": "长" * 400}, None, 413, "context"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10_000}, None, 413, "context"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, None, 422, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, None, 422, "top_p"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, None, 422, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "top_k": -3}, None, 422, "top_k"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, None, 422, "n"),
    ({"model": "tiny"}, None, 422, "prompt"),
    ({"model": "tiny", "prompt": [1, 10**9]}, None, 422, "prompt"),
])
def test_bad_completion_requests_get_openai_errors(live, body, raw, status, names):
    code, _, reply = post(live[0], "/v1/completions", body, raw=raw)
    assert code == status, reply
    assert names in reply["error"]["message"] and reply["error"]["type"]
    assert "Traceback" not in json.dumps(reply)


@pytest.mark.parametrize("messages, status, names", [
    ([], 422, "messages"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 422, "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 422, "last message"),
    ([{"role": "wizard", "content": "a"}], 422, "messages[0].role"),
    ([{"role": "user", "content": "长" * 400}], 413, "context"),
])
def test_bad_chat_requests_get_openai_errors(live, messages, status, names):
    code, _, reply = post(live[0], "/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert code == status, reply
    assert names in reply["error"]["message"]


def test_unknown_route_is_a_json_404(live):
    host, port = live[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/v1/engines")
    resp = conn.getresponse()
    assert resp.status == 404 and "error" in json.loads(resp.read())


def test_old_turns_are_dropped_to_fit_the_context(live):
    long_turns = []
    for i in range(10):
        long_turns += [{"role": "user", "content": f"问题{i}：" + "长城很长。" * 3},
                       {"role": "assistant", "content": "是的。" * 3}]
    messages = long_turns + [{"role": "user", "content": "最后一个问题？"}]
    code, headers, reply = post(live[0], "/v1/chat/completions",
                                {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert code == 200, reply
    dropped = int(headers["x-zhjax-dropped-turns"])
    assert 0 < dropped < 10
    assert reply["usage"]["prompt_tokens"] + 8 <= MAX_SEQ_LEN


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(live, stream):
    base, server, _ = live
    before = server.batcher.released
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": MAX_SEQ_LEN - 8, "stream": stream, "temperature": 0,
            "stop": "never-appears-in-this-output-\u2603"}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read(9) == b": zhjax\n\n"  # streaming has begun
        # the first text event: the request has surely reached the batcher (a client that leaves before that
        # never takes a slot, and there is nothing to free)
        seen = b""
        while b"data:" not in seen:
            assert len(seen) < 4096
            seen += resp.read(1)
    else:
        deadline = time.monotonic() + 30
        while not server.batcher.active:  # wait until it holds a slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while server.batcher.released == before or server.batcher.active:
        assert time.monotonic() < deadline, "the slot of the disconnected client was not freed"
        time.sleep(0.05)


def test_health_and_the_chat_page(live):
    host, port = live[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["slots"] == 8
    assert health["defaults"] == {"max_tokens": 400, "temperature": 0.2, "top_k": 40, "top_p": 0.9,
                                  "repetition_penalty": 1.1}
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    for element in ('id="input"', 'id="reset"', 'id="temperature"', "/v1/chat/completions"):
        assert element in page



# ------------------------------------------------------------------------------------------- the real command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zhjax_serve_command_with_smollm2_answers_as_generate_does(assets, tmp_path):
    """`zhjax serve` as a user starts it, SmolLM2 behind it: the chat answer (greedy, the seed's penalty) equals
    `generate`'s for the same prompt, streamed or not."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "zhjax.cli", "serve", "--model", str(assets.smollm2_dir), "--port", str(port),
         "--max-batch", "4", "--max-seq-len", "256", "--model-name", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "zhjax serve did not come up in 300 s"
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            time.sleep(1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=300, max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of China? 中国的首都是哪里？"}]
        whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    tok = transformers.AutoTokenizer.from_pretrained(assets.smollm2_dir)
    ids = build_prompt("chat", messages[0]["content"], tok)
    expected = generate(zhjax.load_pretrained(assets.smollm2_dir, dtype="float32"), tok, [ids], max_new_tokens=24,
                        greedy=True, repetition_penalty=1.1)[0]
    assert whole.choices[0].message.content == expected and expected
    assert streamed == expected
    assert whole.usage.prompt_tokens == len(ids)


# ------------------------------------------------------------------------------------------- the page in a browser


def chat_answer(base: str, messages: list[dict], max_tokens: int) -> str:
    _, _, reply = post(base, "/v1/chat/completions", {"model": "tiny", "messages": messages,
                                                       "max_tokens": max_tokens, "temperature": 0})
    return reply["choices"][0]["message"]["content"]


def test_chat_page_in_a_headless_browser_streams_keeps_history_and_resets(live, tmp_path, monkeypatch):
    """Debian's chromium driven by playwright: type, see the answer stream in, ask again (the history goes with
    it), reset. A screenshot is saved (its path is printed)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no system chromium: `apt-get install -y chromium` to run the browser test of the chat page")
    # The tiny model decodes its 4-token pieces in milliseconds, so all of them could reach the page in one read
    # (as they once did: 2 updates); 50 ms between pieces, as a real model's pace, lets the page show each one.
    from zhjax.infer import batcher as batching

    decode = batching._decode

    def paced(*args, **kwargs):
        out = decode(*args, **kwargs)
        time.sleep(0.05)
        return out

    monkeypatch.setattr(batching, "_decode", paced)
    base = live[0]
    sent: list[dict] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: r.url.endswith("/chat/completions") and sent.append(r.post_data_json))
            page.goto(base + "/")
            sync_api.expect(page.locator("#status")).to_contain_text("tiny")
            sync_api.expect(page.locator("#temperature")).to_have_value("0.2")  # waits for /health to fill them
            sync_api.expect(page.locator("#top_k")).to_have_value("40")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                               characterData: true}); }""")
            page.fill("#input", "你好，长城有多长？")
            page.press("#input", "Enter")
            first = page.locator(".assistant").nth(0)
            sync_api.expect(first).to_have_attribute("data-done", "true", timeout=60_000)
            expected = chat_answer(base, [{"role": "user", "content": "你好，长城有多长？"}], 24)
            assert first.text_content() == expected and expected
            assert page.evaluate("window.updates") > 3  # the answer came in pieces, not at once
            page.fill("#input", "再说一遍。")
            page.click("#send")
            second = page.locator(".assistant").nth(1)
            sync_api.expect(second).to_have_attribute("data-done", "true", timeout=60_000)
            history = [{"role": "user", "content": "你好，长城有多长？"}, {"role": "assistant", "content": expected},
                       {"role": "user", "content": "再说一遍。"}]
            assert sent[1]["messages"] == history and sent[1]["stream"] is True
            assert second.text_content() == chat_answer(base, history, 24)
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the chat page: {shot}")
            page.click("#reset")
            assert page.locator(".user").count() == 0 and page.locator(".assistant").count() == 0
            sync_api.expect(page.locator(".note")).to_contain_text("history cleared")
            page.fill("#input", "新问题")
            page.press("#input", "Enter")
            sync_api.expect(page.locator(".assistant").nth(0)).to_have_attribute("data-done", "true", timeout=60_000)
            assert sent[2]["messages"] == [{"role": "user", "content": "新问题"}]  # reset forgot the history
        finally:
            browser.close()
