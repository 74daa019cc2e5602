"""Serving throughput and latency: continuous batching (the engine) against static batches of ``generate``.

    python benchmarks/serve_bench.py --out runs/serve_cpu.json                    # bundled model, CPU
    python benchmarks/serve_bench.py --shape 8b --data-parallel 2 --out runs/serve_8b.json   # GPUs
    python benchmarks/serve_bench.py --shape llada2-mini --suite saturated,single   # MoE, block-causal
    python benchmarks/serve_bench.py --suite http --scale 0.125                   # HTTP on loopback, CPU
    python benchmarks/serve_bench.py --suite http --url http://127.0.0.1:8000    # a running `l2pd serve`

A bounded load generator: requests with prompt lengths and answer budgets drawn from a seeded RNG, sent at a
fixed concurrency (a new request as soon as one finishes) or as Poisson arrivals at a set rate. With
``--shape 8b`` (``llada2-mini``) the model is LLaDA-8B-shaped (LLaDA2.0-mini-shaped: mixture of experts,
block-causal) with random bf16 weights built on the GPU and every request
decodes a forced number of tokens per forward (strategy ``steps``, ``steps = budget / tpf``, EoTP off), so
both sides do the same work; on the bundled model requests decode greedily with its filter. Suites:

- ``saturated``: prompts 512, answers 256, 2 x max-batch concurrent clients, timed after 4 x max-batch requests
  of the same load (its graphs captured: a server that has run a while); against ``generate`` at batch
  max-batch on the same requests (all rows at once);
- ``mixed``: prompts 64 to 2,048, answers 64 to 1,024 (multiples of 32), max-batch concurrent clients; against
  static batching: batches of max-batch in arrival order, each run to completion at its longest budget;
- ``single``: one client, prompt 512, answer 256: time per forward against ``generate`` at batch 1;
- ``offline``: max-batch prompts of 512 + 256 handed to ``Engine.generate`` at once (the engine's form of a
  batch decode, after one untimed batch of other prompts) against ``generate`` on the same batch;
- ``poisson``: arrivals at ``--rates`` requests/s, mixed lengths: throughput and latency per rate;
- ``dp``: the saturated load over ``--data-parallel`` engines (one per GPU) against one engine;
- ``http``: mixed lengths through the HTTP front end on loopback (streamed completions, ``--concurrency``
  clients, then Poisson ``--rates``), next to static ``generate`` batches of the same requests;
- ``profile``: a full engine's iteration, wall time against its kernels' device time; ``check``: the bundled
  model's engine answers against ``generate`` on each prompt alone.

Throughput counts answer tokens (up to the first end of text); latencies are per request, from submission
(for static batches: from its arrival to the end of its batch). Every suite but ``http`` runs in-process:
the engine's own loop, no HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def longest(requests) -> int:
    return max(len(p) + g for p, g in requests)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def make_requests(n: int, prompt: tuple[int, int], answer: tuple[int, int], vocab: int | None, avoid: set[int],
                  seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, budget): random tokens of a length in ``prompt`` (8b shapes), or with ``vocab`` None
    the bundled task's held-out questions in its chat template (their own lengths)."""
    rng = random.Random(seed)
    questions = None
    if vocab is None:
        from l2pd.demo import load
        from l2pd.demo.task import split
        from l2pd.demo.tokenizer import prompt_text

        tok = load(device="cpu", filter=False)[1]
        questions = [tok(prompt_text(tok, p.question), add_special_tokens=False)["input_ids"]
                     for p in split("test", n, offset=seed * 1000)]
    out = []
    for i in range(n):
        G = 32 * rng.randint(max(1, answer[0] // 32), answer[1] // 32)
        if questions is not None:
            out.append((questions[i], G))
            continue
        P = rng.randint(*prompt)
        ids = [t for t in (rng.randrange(3, vocab) for _ in range(P + 8)) if t not in avoid][:P]
        out.append((ids, G))
    return out


class Load:
    """Runs requests through engines (in-process) at a fixed concurrency or as Poisson arrivals."""

    def __init__(self, engines, options) -> None:
        self.engines, self.options = engines, options

    def opts(self, G: int) -> dict:
        o = dict(self.options(G))
        o["max_new_tokens"] = G
        return o

    def run(self, requests, concurrency: int | None = None, rate: float | None = None, seed: int = 0,
            warmup: int = 0, steady: bool = False) -> dict:
        """Time the requests; ``warmup`` of them first, untimed, on every engine (kernel compiles, cuBLAS):
        all at once, or with ``steady`` through the same load (so the CUDA graphs of the load's iteration
        shapes are captured before the clock starts, as in a server that has run a while)."""
        for e in self.engines:
            if not steady:
                for ids, G in requests[:warmup]:
                    e.submit(ids, **self.opts(G))
                e.run()
            e.start()
        if steady and warmup:
            for r in self._drive(requests[:warmup], concurrency, rate, seed):
                r.wait(3600)
        for e in self.engines:
            for k in e.counters:
                e.counters[k] = 0
        t0 = time.monotonic()
        records = self._drive(requests[warmup:] if steady else requests, concurrency, rate, seed)
        for r in records:
            r.wait(3600)
        wall = time.monotonic() - t0
        for e in self.engines:
            e.stop(drain=0)
        bad = [f"{r.finish_reason}: {r.error}" for r in records if r.finish_reason not in ("stop", "length")]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(records)} requests failed: {bad[:3]}")
        tokens = sum(len(r.tokens) for r in records)
        lat = [r.finished - r.submitted for r in records]
        ttft = [(r.first_token or r.finished) - r.submitted for r in records]
        return {"requests": len(records), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
                "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
                "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "forwards": sum(r.forwards for r in records),
                "iterations": sum(e.counters["iterations"] for e in self.engines),
                "graphed": sum(e.counters["graphed"] for e in self.engines),
                "graphs": sum(len(e._graphed) for e in self.engines)}

    def _drive(self, requests, concurrency: int | None, rate: float | None, seed: int) -> list:
        """Submit the requests at a fixed concurrency (a new one as one finishes) or as Poisson arrivals."""
        done = threading.Semaphore(0)
        records = []

        def submit(ids, G):
            engine = min(self.engines, key=lambda e: e.load())
            req = engine.submit(ids, on_event=lambda r, toks: done.release() if r.finish_reason else None,
                                **self.opts(G))
            records.append(req)

        if concurrency is not None:
            it = iter(requests)
            for ids, G in [next(it) for _ in range(min(concurrency, len(requests)))]:
                submit(ids, G)
            for ids, G in it:
                done.acquire()
                submit(ids, G)
        else:
            rng = random.Random(seed)
            t = time.monotonic()
            for ids, G in requests:
                t += rng.expovariate(rate)
                time.sleep(max(0.0, t - time.monotonic()))
                submit(ids, G)
        return records


class HttpLoad:
    """The same loads over HTTP: streamed ``POST /v1/completions`` (prompt as token ids, l2pd's options in the
    body) from client threads; the time to first token is the first text chunk, the counts come from usage."""

    def __init__(self, url: str, options) -> None:
        from urllib.parse import urlparse

        u = urlparse(url)
        self.host, self.port, self.options = u.hostname, u.port or 80, options

    def one(self, ids: list[int], G: int) -> dict:
        import http.client

        body = dict(self.options(G), prompt=ids, max_tokens=G, stream=True, stream_options={"include_usage": True})
        body.pop("max_new_tokens", None)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        first, usage, finish = None, None, None
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for ch in data.get("choices", []):
                if ch.get("text") and first is None:
                    first = time.monotonic()
                finish = ch.get("finish_reason") or finish
        conn.close()
        end = time.monotonic()
        return {"submitted": t0, "first": first or end, "finished": end, "usage": usage, "finish": finish}

    def run(self, requests, concurrency: int | None = None, rate: float | None = None, seed: int = 0) -> dict:
        import concurrent.futures as cf

        t0 = time.monotonic()
        if concurrency is not None:
            with cf.ThreadPoolExecutor(concurrency) as pool:
                records = list(pool.map(lambda r: self.one(*r), requests))
        else:
            rng = random.Random(seed)
            futures, t = [], t0
            with cf.ThreadPoolExecutor(256) as pool:
                for ids, G in requests:
                    t += rng.expovariate(rate)
                    time.sleep(max(0.0, t - time.monotonic()))
                    futures.append(pool.submit(self.one, ids, G))
                records = [f.result() for f in futures]
        wall = time.monotonic() - t0
        bad = [r["finish"] for r in records if r["finish"] not in ("stop", "length")]
        if bad:
            raise RuntimeError(f"requests failed: {bad[:5]}")
        tokens = sum(r["usage"]["completion_tokens"] for r in records)
        lat = [r["finished"] - r["submitted"] for r in records]
        ttft = [r["first"] - r["submitted"] for r in records]
        return {"requests": len(records), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
                "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
                "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "forwards": sum(r["usage"]["forwards"] for r in records)}


def start_server(model, tok, max_batch: int, max_length: int):
    """``l2pd serve``'s app on a free loopback port, on a background thread: (url, stop)."""
    import socket

    import uvicorn

    from l2pd.engine import Engine
    from l2pd.serve.app import Server, build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = Engine(model, max_batch=max_batch, max_length=max_length, tokenizer=tok,
                    filter=getattr(model, "l2pd_filter", None))
    uv = uvicorn.Server(uvicorn.Config(build_app(Server([engine], tok, "bench", max_queue=100000)), host="127.0.0.1",
                                       port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)

    def stop():
        uv.should_exit = True
        thread.join(timeout=60)

    return f"http://127.0.0.1:{port}", stop


def static_batches(model, requests, batch: int, options, pad_id: int, arrivals: list[float] | None = None,
                   warmup: bool = True) -> dict:
    """``generate`` over batches of ``batch`` requests in arrival order, each run to its longest budget."""
    import gc

    from l2pd.decode import release

    gc.collect()  # the engines of the last load, and their K/V pools, go first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    device = next(model.parameters()).device
    eos = model.config.eos_token_id
    if warmup:  # the first batch once, untimed (kernel compiles, graph captures)
        static_batches(model, requests[:batch], batch, options, pad_id, warmup=False)
    tokens, lat, clock = 0, [], 0.0
    t_start = time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        P = max(len(ids) for ids, _ in group)
        G = max(G for _, G in group)
        ids = torch.full((len(group), P), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), P, dtype=torch.long)
        for r, (p, _) in enumerate(group):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        ready = max(arrivals[i : i + batch]) if arrivals else 0.0
        clock = max(clock, ready)
        t = time.perf_counter()
        out = model.generate(ids.to(device), attention_mask=mask.to(device), **dict(options(G), max_new_tokens=G))
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock += time.perf_counter() - t
        for r, (_, g) in enumerate(group):
            ans = out[r, P : P + g].tolist()
            tokens += ans.index(eos) if eos in ans else len(ans)
            lat.append(clock - (arrivals[i + r] if arrivals else 0.0))
    wall = clock if arrivals else time.perf_counter() - t_start
    release(model)  # its kept buffers (a K/V cache of this batch's shape)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"requests": len(requests), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99)}


def offline_engine(engine, warm, reqs, options) -> dict:
    """``Engine.generate`` on all of ``reqs`` at once (one shared budget), after the same on ``warm``."""
    G = reqs[0][1]
    engine.generate([ids for ids, _ in warm], **dict(options(G), max_new_tokens=G))
    for k in engine.counters:
        engine.counters[k] = 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = engine.generate([ids for ids, _ in reqs], **dict(options(G), max_new_tokens=G))
    wall = time.perf_counter() - t0
    bad = [r.finish_reason for r in done if r.finish_reason not in ("stop", "length")]
    if bad:
        raise RuntimeError(f"requests failed: {bad[:5]}")
    tokens = sum(len(r.tokens) for r in done)
    return {"requests": len(done), "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
            "iterations": engine.counters["iterations"], "graphed": engine.counters["graphed"]}


def profile_engine(engine, reqs, options, warm: int = 40, iters: int = 6) -> dict:
    """Steady state of a full engine: wall time per iteration against the device time of its kernels, by
    kind (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for ids, G in reqs:
        engine.submit(ids, max_new_tokens=G, **options(G))
    for _ in range(warm):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine.step()
    wall = (time.perf_counter() - t0) / iters
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            engine.step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(ev, "device_time_total", 0) / iters / 1000
        name = ev.key.lower()
        kind = ("matmul" if any(k in name for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas")) else
                "pool_attention" if "pool_attention" in name else
                "l2pd fused" if any(k in name for k in ("_rms_norm", "_rope", "_silu", "skinny", "gate_up")) else
                "decision" if any(k in name for k in ("_decide", "_partial", "_merge")) else
                "moe" if "moe" in name else "other")
        kinds[kind] = kinds.get(kind, 0.0) + t
    out = {"wall_ms_per_iteration": 1e3 * wall, "device_ms_per_iteration": sum(kinds.values()),
           "rows": len(engine.rows), "graphed": engine.counters["graphed"], "iterations": engine.counters["iterations"],
           "graphs": len(engine._graphed)}
    out.update({f"{k}_ms": v for k, v in kinds.items()})
    engine.stop(drain=0)
    return out


def check_bundled(args, n: int = 64) -> dict:
    """The bundled model on this device: engine answers (32 rows at once, mixed budgets) against ``generate``
    on each prompt alone, for the default learn2pd and for threshold at block 32."""
    from l2pd.demo import load
    from l2pd.engine import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load(device=device, family=args.model_family)
    reqs = make_requests(n, (0, 0), (64, 256), None, set(), 7)  # (the bundled models share one tokenizer)
    eos = model.config.eos_token_id
    out = {}
    for name, opts in (("learn2pd", dict(cache="dual", refresh="window")),
                       ("threshold", dict(strategy="threshold", block_length=32, cache="dual", refresh="window"))):
        engine = Engine(model, max_batch=32, filter=model.l2pd_filter)
        handles = [engine.submit(p, max_new_tokens=g, **opts) for p, g in reqs]
        engine.run()
        got = [h.tokens for h in handles]
        same = 0
        for (p, g), toks in zip(reqs, got):
            a = model.generate(torch.tensor([p], device=device), max_new_tokens=g, **opts)[0, len(p):].tolist()
            same += (a[: a.index(eos)] if eos in a else a) == toks
        out[f"{name}_identical"] = same
    out["requests"] = n
    return out


def setup(args):
    from l2pd.engine import Engine

    if args.shape in ("8b", "llada2-mini"):
        from decode_8b import build_model

        import l2pd
        from l2pd.models import LLaDA2Config, LLaDA2MoeModelLM

        classes = (LLaDA2MoeModelLM, LLaDA2Config) if args.shape == "llada2-mini" else ()
        devices = [f"cuda:{i}" for i in range(args.data_parallel)]
        models = []
        for d in devices:
            with torch.cuda.device(d):
                models.append(l2pd.patch(build_model(*classes)))
        tpf = args.tpf

        def options(G):
            return dict(strategy="steps", steps=max(1, G // tpf), block_length=32, cache="dual", refresh="window",
                        eotp=False)

        vocab = min(126000, models[0].config.vocab_size)
        avoid = {models[0].config.mask_token_id, models[0].config.eos_token_id}
        pad = models[0].config.eos_token_id
    else:
        from l2pd.demo import load

        models, devices = [], []
        for i in range(args.data_parallel):
            d = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            d = f"cuda:{i}" if d == "cuda" else d
            models.append(load(device=d, family=args.model_family)[0])
            devices.append(d)

        def options(G):
            return dict(cache="dual", refresh="window")

        cfg = models[0].config
        vocab, avoid, pad = None, {cfg.mask_token_id, cfg.eos_token_id}, cfg.eos_token_id

    def engines(n, max_length):
        return [Engine(models[i], max_batch=args.max_batch, max_length=max_length, max_block_length=128,
                       filter=getattr(models[i], "l2pd_filter", None), max_step_tokens=args.max_step_tokens)
                for i in range(n)]

    return models, engines, options, vocab, avoid, pad


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["bundled", "8b", "llada2-mini"], default="bundled",
                    help="bundled model, or random bf16 weights on the GPU at LLaDA-8B or LLaDA2.0-mini shapes")
    ap.add_argument("--suite", default="saturated,mixed,single", help="comma list: saturated, mixed, single, offline, "
                    "poisson, dp, http, profile, check")
    ap.add_argument("--max-batch", type=int, default=None, help="rows per engine (default 64 on GPU, 8 on CPU)")
    ap.add_argument("--requests", type=int, default=None, help="requests per load (default 4 x max-batch)")
    ap.add_argument("--static-batch", type=int, default=None,
                    help="rows of a static batch in the mixed suite (default max-batch; the largest that fits)")
    ap.add_argument("--max-step-tokens", type=int, default=8192, help="the engines' fed-token budget per iteration")
    ap.add_argument("--tpf", type=int, default=8, help="forced tokens per forward (8b shapes)")
    ap.add_argument("--rates", default="1,2,4", help="Poisson arrival rates, requests/s")
    ap.add_argument("--data-parallel", type=int, default=1)
    ap.add_argument("--url", default=None, help="the http suite against a running `l2pd serve` (default: one started "
                    "here on a free loopback port)")
    ap.add_argument("--concurrency", default="1,8,32", help="client counts of the http suite")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model-family", default="llada", choices=["llada", "dream", "llada2"],
                    help="which bundled model (shape bundled, and the check suite)")
    ap.add_argument("--scale", type=float, default=1.0, help="lengths times this (CPU: 0.125 keeps it short)")
    ap.add_argument("--out", default=None)
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and args.device != "cpu"
    args.max_batch = args.max_batch or (64 if gpu else 8)
    n_req = args.requests or 4 * args.max_batch
    suites = args.suite.split(",")
    if suites == ["check"]:
        models = engines = options = vocab = avoid = pad = None
    else:
        models, engines, options, vocab, avoid, pad = setup(args)
    s = args.scale

    def sc(x):
        return max(32, int(x * s) // 32 * 32) if x >= 32 else x

    results: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
                     "shape": args.shape, "max_batch": args.max_batch, "tpf": args.tpf, "scale": s}

    def report(name, r):
        results[name] = r
        print(f"{name:32s} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items()), flush=True)

    if "profile" in suites:
        reqs = make_requests(2 * args.max_batch, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 6)
        report("profile", profile_engine(engines(1, longest(reqs))[0], reqs, options))
    if "saturated" in suites or "dp" in suites:
        reqs = make_requests(n_req, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 1)
        # warmed up on the same load (other prompts): the graphs of its iteration shapes exist before timing
        warm = make_requests(4 * args.max_batch, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 11)
        report("saturated_engine", Load(engines(1, longest(reqs)), options).run(warm + reqs, 2 * args.max_batch,
                                                                                   warmup=len(warm), steady=True))
        torch.cuda.empty_cache() if gpu else None
        report("saturated_generate", static_batches(models[0], reqs, args.max_batch, options, pad))
        results["saturated_ratio"] = results["saturated_engine"]["tok_s"] / results["saturated_generate"]["tok_s"]
        print(f"saturated engine / generate: {results['saturated_ratio']:.3f}")
        if "dp" in suites and args.data_parallel > 1:
            reqs2 = make_requests(2 * n_req, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 2)
            report("dp_engines", Load(engines(args.data_parallel, longest(reqs2)), options).run(
                reqs2, 2 * args.max_batch * args.data_parallel, warmup=args.max_batch))
            results["dp_ratio"] = results["dp_engines"]["tok_s"] / results["saturated_engine"]["tok_s"]
            print(f"data parallel {args.data_parallel} / one engine: {results['dp_ratio']:.3f}")
    if "mixed" in suites:
        reqs = make_requests(n_req, (sc(64), sc(2048)), (sc(64), sc(1024)), vocab, avoid, 3)
        report("mixed_engine", Load(engines(1, longest(reqs)), options).run(reqs, args.max_batch,
                                                                            warmup=args.max_batch // 4))
        torch.cuda.empty_cache() if gpu else None
        # static batching of the same requests, all there at the start (its best case)
        report("mixed_static", static_batches(models[0], reqs, args.static_batch or args.max_batch, options, pad))
        results["mixed_ratio"] = results["mixed_engine"]["tok_s"] / results["mixed_static"]["tok_s"]
        print(f"mixed continuous / static: {results['mixed_ratio']:.3f}")
    if "single" in suites:
        reqs = make_requests(6, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 4)
        r = Load(engines(1, longest(reqs)), options).run(reqs, 1, warmup=1)
        r["ms_per_forward"] = 1e3 * r["seconds"] / r["forwards"]
        report("single_engine", r)
        g = static_batches(models[0], reqs, 1, options, pad)
        g["ms_per_forward"] = 1e3 * g["seconds"] / r["forwards"]  # the same forwards per request (forced)
        report("single_generate", g)
    if "offline" in suites:
        reqs = make_requests(args.max_batch, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 12)
        warm = make_requests(args.max_batch, (sc(512), sc(512)), (sc(256), sc(256)), vocab, avoid, 13)
        report("offline_engine", offline_engine(engines(1, longest(reqs))[0], warm, reqs, options))
        torch.cuda.empty_cache() if gpu else None
        report("offline_generate", static_batches(models[0], reqs, args.max_batch, options, pad))
        results["offline_ratio"] = results["offline_engine"]["tok_s"] / results["offline_generate"]["tok_s"]
        print(f"offline Engine.generate / generate: {results['offline_ratio']:.3f}")
    if "poisson" in suites:
        for rate in [float(x) for x in args.rates.split(",")]:
            reqs = make_requests(n_req, (sc(64), sc(2048)), (sc(64), sc(1024)), vocab, avoid, 5)
            report(f"poisson_{rate:g}", Load(engines(1, longest(reqs)), options).run(reqs, rate=rate))
    if "http" in suites:  # the HTTP front end on loopback: fixed concurrencies and Poisson rates, mixed lengths
        reqs = make_requests(n_req, (sc(64), sc(2048)), (sc(64), sc(1024)), vocab, avoid, 8)
        if args.url:
            url, stop = args.url, None
        else:
            from l2pd.demo import load

            url, stop = start_server(models[0], load(device="cpu", filter=False)[1] if args.shape == "bundled"
                                     else None, args.max_batch, longest(reqs))
        load_ = HttpLoad(url, options)
        load_.run(reqs[: args.max_batch], args.max_batch)  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            report(f"http_c{c}", load_.run(reqs, c))
        for rate in [float(x) for x in args.rates.split(",")]:
            report(f"http_poisson_{rate:g}", load_.run(reqs, rate=rate))
        if stop is not None:
            stop()
        report("http_static", static_batches(models[0], reqs, args.max_batch, options, pad))
    if "check" in suites:
        report("check", check_bundled(args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
