"""``l2pd serve``: real HTTP on 127.0.0.1 with the official ``openai`` client, the bundled model on the CPU.

Every answer equals what offline greedy ``generate`` gives its prompt alone; streams concatenate to the
non-streamed text; a dropped stream frees its row; a full queue answers 429; bad input answers 400 naming
the field; a bounded load test loses and mixes up nothing; SIGTERM drains and exits.
"""

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from l2pd.engine import Engine  # noqa: E402
from l2pd.serve.app import Server, build_app  # noqa: E402


def _questions(n: int) -> list[str]:
    from l2pd.demo.task import split

    return [p.question for p in split("test", n)]


QUESTIONS = _questions(5)  # the bundled model's task: answered in a forward or two


@pytest.fixture(scope="module")
def bundled():
    from l2pd.demo import load

    return load(family="llada", device="cpu")  # exact fp32 arithmetic


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server on a background thread, stopped at exit."""

    def __init__(self, engines, tok, **kw) -> None:
        self.port = _free_port()
        self.server = Server(engines, tok, "bundled", **kw)
        config = uvicorn.Config(build_app(self.server), host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=120)

    def raw(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = {"text": data.decode()}
        return r.status, dict(r.getheaders()), parsed

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def running(bundled):
    model, tok = bundled
    engine = Engine(model, max_batch=8, tokenizer=tok, filter=model.l2pd_filter, backend="torch")
    r = Running([engine], tok, max_queue=512)
    yield r
    r.stop()


def _offline(model, tok, question: str, **options) -> str:
    """What greedy ``generate`` answers for this chat message alone, as text."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), backend="torch", cache="dual", refresh="window", **options)
    answer = out[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    return tok.decode(answer[: answer.index(eos)] if eos in answer else answer, skip_special_tokens=True)


def _ask(client, question, **kw):
    extra = {k: kw.pop(k) for k in list(kw) if k in ("strategy", "threshold", "block_length", "eotp", "cache",
                                                      "refresh", "steps", "edit_threshold", "edit_steps")}
    return client.chat.completions.create(model="bundled", messages=[{"role": "user", "content": question}],
                                          temperature=0, extra_body=extra or None, **kw)


def test_concurrent_clients_get_their_offline_answers(running, bundled):
    model, tok = bundled
    jobs = [(q, dict(max_tokens=48 + 16 * (i % 4), **({} if i % 2 else dict(strategy="threshold", block_length=16))))
            for i, q in enumerate(QUESTIONS * 7)][:32]
    with cf.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_ask, running.client, q, **dict(kw)) for q, kw in jobs]
        results = [f.result() for f in futures]
    want = {}
    for (q, kw), r in zip(jobs, results):
        key = (q, json.dumps(kw, sort_keys=True))
        if key not in want:
            opts = dict(kw)
            want[key] = _offline(model, tok, q, max_new_tokens=opts.pop("max_tokens"), **opts)
        assert r.choices[0].message.content == want[key], key
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
        assert r.usage.model_extra["forwards"] >= 1


def test_a_block_causal_model_is_served_with_its_offline_answers():
    """The bundled LLaDA 2.x-format model (mixture of experts, block-causal) behind the same API."""
    from l2pd.demo import load

    model, tok = load(family="llada2", device="cpu")
    engine = Engine(model, max_batch=4, tokenizer=tok, filter=model.l2pd_filter, backend="torch")
    r = Running([engine], tok, max_queue=64)
    try:
        jobs = [(q, dict(max_tokens=40 + 8 * i, **({} if i % 2 else dict(strategy="threshold", block_length=8))))
                for i, q in enumerate(QUESTIONS[:4])]
        jobs.append((QUESTIONS[4], dict(max_tokens=48, strategy="threshold", threshold=0.7, block_length=16,
                                        edit_threshold=0.3, edit_steps=4)))  # LLaDA 2.1's token editing
        with cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda job: _ask(r.client, job[0], **dict(job[1])), jobs))
        for (q, kw), got in zip(jobs, results):
            opts = dict(kw)
            assert got.choices[0].message.content  # an answer, not an empty string on both sides
            assert got.choices[0].message.content == _offline(model, tok, q, max_new_tokens=opts.pop("max_tokens"),
                                                              **opts), kw
    finally:
        r.stop()


def test_streamed_chunks_concatenate_to_the_answer(running):
    for chat in (True, False):
        kw = dict(max_tokens=64, extra_body=dict(strategy="threshold", block_length=8))
        if chat:
            full = _ask(running.client, QUESTIONS[1], max_tokens=64, strategy="threshold", block_length=8)
            stream = running.client.chat.completions.create(
                model="bundled", messages=[{"role": "user", "content": QUESTIONS[1]}], stream=True,
                stream_options={"include_usage": True}, **kw)
            parts, finish, usage = [], None, None
            for c in stream:
                if c.usage is not None:
                    usage = c.usage
                for ch in c.choices:
                    parts.append(ch.delta.content or "")
                    finish = ch.finish_reason or finish
            assert "".join(parts) == full.choices[0].message.content
            assert usage.completion_tokens == full.usage.completion_tokens
            assert len([p for p in parts if p]) > 1  # it did arrive in pieces
        else:
            full = running.client.completions.create(model="bundled", prompt="Ana has 3 apples", **kw)
            stream = running.client.completions.create(model="bundled", prompt="Ana has 3 apples", stream=True, **kw)
            parts, finish = [], None
            for c in stream:
                parts.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            assert "".join(parts) == full.choices[0].text
        assert finish == (full.choices[0].finish_reason)


def test_a_dropped_stream_frees_its_row(running):
    """A client that goes away mid-stream (its socket closed after the first event) frees its row."""
    engine = running.server.engines[0]
    before = engine.counters["cancelled"]
    # one token per forward over a block of 256: hundreds of forwards before the answer is final
    body = json.dumps({"model": "bundled", "messages": [{"role": "user", "content": QUESTIONS[0]}],
                       "max_tokens": 512, "stream": True, "strategy": "steps", "block_length": 256}).encode()
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got, deadline = b"", time.time() + 60
    while b"data: " not in got:  # the first event (the assistant's role) arrived: the request is in
        chunk = sock.recv(4096)  # (the socket's own timeout bounds each read)
        assert chunk and time.time() < deadline, f"no event before the server closed: {got[:200]!r}"
        got += chunk
    deadline = time.time() + 30
    while not engine.rows:  # admitted at the engine's next iteration
        assert time.time() < deadline and engine.counters["finished"] >= 0
        time.sleep(0.01)
    sock.close()
    deadline = time.time() + 30
    while engine.counters["cancelled"] == before:
        assert time.time() < deadline, "the dropped stream's row was not freed"
        time.sleep(0.05)
    assert not engine.rows


def test_stop_strings_cut_the_text(running, bundled):
    model, tok = bundled
    full = _ask(running.client, QUESTIONS[0], max_tokens=96).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = _ask(running.client, QUESTIONS[0], max_tokens=96, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(stop)]


BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi <|mdm_mask|> there"}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "strategy": "fastest"}, "strategy"),
    ("/v1/completions", {"prompt": "hi", "threshold": "high"}, "threshold"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0.5}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "block_length": 1000}, "block_length"),
    ("/v1/completions", {"prompt": "hi", "edit_threshold": "low"}, "edit_threshold"),
    ("/v1/completions", {"prompt": "hi", "edit_steps": 2}, "edit_steps"),  # without edit_threshold
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
]


@pytest.mark.parametrize("path, body, param", BAD)
def test_bad_input_answers_400_naming_the_field(running, path, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, data = running.raw("POST", path, raw)
    assert status == 400, data
    err = data["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_unknown_model_is_404_and_routes_answer(running):
    status, _, data = running.raw("POST", "/v1/completions", json.dumps({"model": "gpt-9", "prompt": "hi"}).encode())
    assert status == 404 and data["error"]["param"] == "model"
    assert [m.id for m in running.client.models.list().data] == ["bundled"]
    assert running.raw("GET", "/health")[0] == 200
    status, _, data = running.raw("GET", "/metrics")
    text = data["text"]
    for name in ("l2pd_queue_depth", "l2pd_active_rows", "l2pd_tokens_per_second", "l2pd_forwards_total",
                 "l2pd_step_seconds_bucket", "l2pd_rejected_requests_total", "l2pd_requests_total"):
        assert name in text, name


def test_full_queue_answers_429_with_retry_after(bundled):
    model, tok = bundled
    engine = Engine(model, max_batch=1, tokenizer=tok, backend="torch")
    r = Running([engine], tok, max_queue=0)
    try:
        # one token per forward over a whole answer (tens of forwards): the row stays busy
        with cf.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(lambda: _ask(r.client, QUESTIONS[0], max_tokens=256, strategy="steps",
                                            block_length=32, eotp=False))
            deadline = time.time() + 30
            while not engine.rows:
                assert time.time() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as info:
                r.client.completions.create(model="bundled", prompt="Ben has", max_tokens=8)
            assert info.value.response.headers["retry-after"] == "1"
            assert info.value.body["code"] == "queue_full"
            assert busy.result().choices[0].finish_reason in ("stop", "length")
        assert 'l2pd_rejected_requests_total{reason="queue_full"} 1.0' in r.raw("GET", "/metrics")[2]["text"]
    finally:
        r.stop()


def test_a_request_past_its_timeout_gets_504(bundled):
    model, tok = bundled
    engine = Engine(model, max_batch=2, tokenizer=tok, backend="torch")
    r = Running([engine], tok, request_timeout=0.0)
    try:
        status, _, data = r.raw("POST", "/v1/completions", json.dumps({"prompt": "Ana has", "max_tokens": 16}).encode())
        assert status == 504 and data["error"]["code"] == "timeout"
        assert engine.counters["timed_out"] == 1 and not engine.rows
    finally:
        r.stop()


def test_load_200_requests_from_32_clients_none_lost_or_mixed(bundled):
    """Two engines (data parallel on one CPU, sharing the weights) behind one front end."""
    model, tok = bundled
    engines = [Engine(model, max_batch=8, tokenizer=tok, filter=model.l2pd_filter, backend="torch")
               for _ in range(2)]
    r = Running(engines, tok, max_queue=1000)
    try:
        want = {q: _offline(model, tok, q, max_new_tokens=64) for q in QUESTIONS}
        asks = [QUESTIONS[i % len(QUESTIONS)] for i in range(200)]
        with cf.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda q: _ask(r.client, q, max_tokens=64).choices[0].message.content, asks))
        assert answers == [want[q] for q in asks]
        assert all(e.counters["admitted"] > 0 for e in engines)  # both engines served
        assert sum(e.counters["finished"] for e in engines) == 200
    finally:
        r.stop()


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "l2pd", "serve", "--port", str(port), "--device", "cpu",
                             "--max-batch", "2", "--drain-timeout", "60",
                             "--run-ahead", "auto"],  # (the CPU's default is off: drain with iterations ahead)
                            env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.2)
        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: client.completions.create(
                model="l2pd-bundled-llada", prompt="Ana has 3 apples", max_tokens=96,
                extra_body=dict(strategy="steps", block_length=32, eotp=False)))
            time.sleep(1.0)  # the request is decoding
            proc.send_signal(signal.SIGTERM)
            answer = fut.result(timeout=120)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.forwards > 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
