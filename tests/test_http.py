"""OpenAI-compatible HTTP on the pool's server (runtime/services/http.py) and continuous batching
(runtime/engine/scheduler.py), on the CPU with the fp32 SmolLM2 image, through the official ``openai`` client
and raw HTTP (httpx).

  test_scheduler_rows_equal_solo       in-process: prompts of mixed lengths joining a running batch at different
      steps (prompts chunked over passes) each get exactly their solo greedy tokens; a sampled request its solo
      draws; a cancelled row is free after one turn and gets nothing more; its row is reused.
  test_app_not_ready_and_queue_full    the ASGI app alone: /health 503 while loading, /v1 503; a full queue 429.
  test_answers_equal_run               one server (module fixture, --api-key): chat and completions, plain and
      streamed, equal ``launch.py run``'s greedy tokens; chunks carry one id, the role first, finish_reason last,
      the usage chunk, ``data: [DONE]``; /v1/models; /health; stop strings.
  test_sixteen_concurrent_clients      16 clients with prompts of 1..60 tokens, sent while a long stream runs:
      each equals its solo run, and the server's largest batch shows that they shared passes.
  test_disconnect_frees_slot           a client that drops a stream mid-way: its row is freed (active requests
      back to 0, cancelled count up), and the server keeps serving.
  test_errors                          malformed JSON, unknown model, a prompt over the context, max_tokens < 1,
      n over 16, a missing or wrong API key, a body over 8 MiB, an unknown path: status and OpenAI-shaped error;
      then a good request is still served.
  test_unsupported_fields_refused      every field the server does not serve (and values it does not: best_of
      above n, a suffix, an unknown response_format, top_logprobs without logprobs, tool_choice without tools,
      tools with a template that shows none): 400 naming it.
  test_logprobs_and_fields             log-probabilities (chat top_logprobs; completions logprobs with echo: the
      prompt's too) equal the log-softmax of the logits of one in-process forward; logit_bias forces a token;
      top_k 1 and min_p 1 sample the greedy tokens; penalties, top-k and min-p together give the tokens of an
      in-process scheduler with the same settings; n = 3 choices are the solo runs of seed + i, the prompt counted
      once; models.retrieve; the batch-size gauge reads 0 when idle.
  test_json_schema_answers             response_format json_schema: 6 prompts' answers (sent at once, one
      streamed) validate against the schema (jsonschema); json_object answers are JSON objects.
  test_serve_foreground_stops_with_pool  ``launch.py serve --http 0``: serves, SIGINT stops server and pool, no
      leftovers, the port closed.
The module's server stops with its pool at the end (``pool stop``): no process, record, socket or /dev/shm name
of its pool is left, and its port is closed. About two minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, long_stream, run_launch, scrape_metrics, wait_until

from runtime.engine.config import PrefillConfig, SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, SeqRequest
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.tokens import image_tokenizer
from runtime.ipc import records
from runtime.ipc.shm import leftover_names

openai = pytest.importorskip("openai")

KEY = "test-key-7f3a"
MAX_LEN = 256
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def gen(smol_image):
    """The in-memory reference: what ``launch.py run`` computes (Generator.generate over the image). One compute
    thread: this process's share beside the server's (torch's default of every core, with the server computing
    too, made the references ten times slower on 2 busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Generator(InMemoryWeights(Image.open(smol_image), "cpu", quiet=True), MAX_LEN)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(smol_image):
    return image_tokenizer(Image.open(smol_image), required=True)


def solo(gen: Generator, tok, prompt: list[int], new: int) -> list[int]:
    return gen.generate(prompt, SamplingConfig(new), tok.eos_ids).output_token_ids


# ---- the scheduler alone ------------------------------------------------------------------------------------


def test_scheduler_rows_equal_solo(gen, tok):
    rnd = random.Random(20)
    print("seed 20")
    prompts = [[rnd.randrange(1, gen.args.vocab_size) for _ in range(n)] for n in (5, 70, 1, 20, 9)]
    new = 5
    refs = [gen.generate(p, SamplingConfig(new)).output_token_ids for p in prompts]
    sampled = SamplingConfig(new, 0.8, 0.9, 7)
    ref_sampled = gen.generate(prompts[1], sampled).output_token_ids
    chunked = Generator(gen.source, MAX_LEN, prefill=PrefillConfig(chunk=32))  # 70 tokens: 3+ passes
    sched = Scheduler(chunked, SchedulerConfig(max_batch=3, max_queue=8))
    events: dict[int, list] = {}

    def req(p, cfg: SamplingConfig | None = None) -> SeqRequest:
        i = len(events)
        events[i] = []
        return SeqRequest(p, cfg or SamplingConfig(new), lambda k, x: events[i].append((k, x)))

    reqs = [req(p) for p in prompts[:2]]
    for r in reqs:
        sched.submit(r)
    sched.tick()
    sched.tick()  # the first two are mid-way when the others join
    reqs += [req(p) for p in prompts[2:]] + [req(prompts[1], sampled)]
    for r in reqs[2:]:
        sched.submit(r)
    fillers = []
    with pytest.raises(QueueFull):
        for _ in range(8):
            fillers.append(req([1, 2]))
            sched.submit(fillers[-1])
    for r in fillers:
        sched.cancel(r)  # they only filled the queue
    victim = req([5, 6, 7], SamplingConfig(20))
    vi = len(events) - 1
    sched.submit(victim)
    cancelled_at = None
    for _ in range(400):
        if not sched.tick():
            break
        toks = [x for k, x in events[vi] if k == "token"]
        if len(toks) >= 2 and cancelled_at is None:
            sched.cancel(victim)
            cancelled_at = len(toks)
            sched.tick()  # one turn: its row is free before that turn's step
            assert all(r is None or r.req.id != victim.id for r in sched.rows)
    assert cancelled_at == 2, "the cancelled request never got its first tokens"
    assert len([x for k, x in events[vi] if k == "token"]) == 2 and not any(k == "done" for k, _ in events[vi])
    done = [next(x for k, x in events[i] if k == "done").output_token_ids for i in range(len(prompts) + 1)]
    assert done[:len(prompts)] == refs, f"{done} != {refs}"
    assert done[len(prompts)] == ref_sampled
    assert sched.max_rows_seen == 3 and sched.active() == 0 and sched.queue_depth() == 0


# ---- the app alone -------------------------------------------------------------------------------------------


class _FullScheduler:
    """Stands in for the scheduler: its queue is always full."""

    class gen:  # noqa: N801
        class args:  # noqa: N801
            vocab_size = 100

    cancelled = prefilled_tokens = cached_tokens = spec_passes = spec_tokens = 0
    observer = None

    def batch_size(self):
        return 8

    def submit(self, req):
        raise QueueFull("64 requests are waiting (--max-queue 64)")

    def queue_depth(self):
        return 64

    def active(self):
        return 8


def test_app_not_ready_and_queue_full():
    import asyncio

    from runtime.services.http import HttpConfig, ServiceState, build_app

    async def go():
        state = ServiceState(HttpConfig("m", 64))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://t") as c:
            r = await c.get("/health")
            assert (r.status_code, r.json()) == (503, {"status": "loading"})
            r = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading", r.text
            state.attach(_FullScheduler(), None)
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert "llmstream_queue_depth 64.0" in (await c.get("/metrics")).text

    asyncio.run(go())


# ---- one server for the module ----------------------------------------------------------------------------


class Served:
    def __init__(self, name: str, url: str, pid: int) -> None:
        self.name, self.url, self.pid = name, url, pid
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.url)


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) != 0


@pytest.fixture(scope="module")
def server(smol_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("httppools")
    old = os.environ.get("LLMS_POOL_DIR")
    os.environ["LLMS_POOL_DIR"] = str(d)
    name = f"ht{os.getpid()}"
    started = False
    try:
        run_launch("pool", "start", "--image", str(smol_image), "--name", name, "--quiet", timeout=120)
        started = True
        run_launch("pool", "serve", name, "--device", "cpu", "--max-seq-len", str(MAX_LEN), "--http", "127.0.0.1:0",
                   "--api-key", KEY, "--max-batch", "20", "--max-queue", "32", "--prefill-chunk", "64", "--quiet",
                   timeout=180)
        rec = records.live_server(name)
        yield Served(name, rec["http"], rec["pid"])
        pid, url = rec["pid"], rec["http"]
        run_launch("pool", "stop", name, timeout=60)
        started = False
        wait_until(lambda: not _alive(pid), 10, "the server exits")
        assert _port_closed(url), f"{url} still accepts connections"
        assert records.read_server_record(name) is None and not records.pool_file(name, "socket").exists()
        assert leftover_names(pool=name) == []
    finally:
        if started:
            with contextlib.suppress(Exception):
                run_launch("pool", "stop", name, check=False, timeout=60)
        if old is None:
            os.environ.pop("LLMS_POOL_DIR", None)
        else:
            os.environ["LLMS_POOL_DIR"] = old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3] + " ":
            return False
    return True


def _ids(choice) -> list[int]:
    return (choice.model_extra or {})["token_ids"]


def test_answers_equal_run(server, smol_image, tok, tmp_path):
    new = 12
    js = tmp_path / "run.json"
    run_launch("run", "--image", str(smol_image), "--prompt", QUESTION, "--chat", "--max-new-tokens", str(new),
               "--device", "cpu", "--quiet", "--out-json", str(js))
    want = json.loads(js.read_text())
    ref = want["output_token_ids"]
    c = server.client
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    msgs = [{"role": "user", "content": QUESTION}]

    r = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=new, temperature=0,
                                  extra_body={"return_token_ids": True})
    text = tok.decode([t for t in ref if t not in tok.eos_ids])
    assert _ids(r.choices[0]) == ref and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if want["stop_reason"] == "stop_token" else "length")
    assert r.usage.prompt_tokens == len(want["prompt_token_ids"]) and r.usage.completion_tokens == len(ref)

    chunks = list(c.chat.completions.create(model=server.model, messages=msgs, max_tokens=new, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [ch for ch in chunks if ch.choices]
    assert [ch.choices[0].finish_reason for ch in body][-1] == r.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == r.choices[0].message.content
    assert [t for ch in body for t in (ch.choices[0].model_extra or {}).get("token_ids", [])] == ref
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)

    # completions over raw HTTP: token ids in, plain and streamed
    prompt = want["prompt_token_ids"]
    hdr = {"Authorization": f"Bearer {KEY}"}
    body = {"model": server.model, "prompt": prompt, "max_tokens": new, "temperature": 0, "return_token_ids": True}
    j = httpx.post(f"{server.url}/v1/completions", json=body, headers=hdr, timeout=120).json()
    assert j["object"] == "text_completion" and j["choices"][0]["token_ids"] == ref, j
    assert j["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ref),
                          "total_tokens": len(prompt) + len(ref),  # the chat requests' KV entries reused:
                          "prompt_tokens_details": {"cached_tokens": len(prompt) - 1}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=hdr,
                      timeout=120) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        data = [ln[len("data: "):] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    parts = [json.loads(x) for x in data[:-1]]
    assert "".join(p["choices"][0]["text"] for p in parts) == j["choices"][0]["text"]
    assert [t for p in parts for t in p["choices"][0].get("token_ids", [])] == ref

    # a stop string ends the answer before it
    cut = text.split()[2]
    r = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=new, temperature=0, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[:text.index(cut)]


def test_sixteen_concurrent_clients(server, gen, tok):
    rnd = random.Random(16)
    print("seed 16")
    lengths = [3, 60, 7, 40, 1, 52, 15, 33, 5, 45, 21, 28, 9, 37, 2, 24]
    prompts = [[rnd.randrange(1, gen.args.vocab_size) for _ in range(n)] for n in lengths]
    new = 6
    refs = [solo(gen, tok, p, new) for p in prompts]
    hdr = {"Authorization": f"Bearer {KEY}"}
    with long_stream(server.url, 200, hdr, timeout=120):  # a long stream the others join while it runs
        before = server.metrics()
        got: list = [None] * len(prompts)

        def one(i: int) -> None:
            r = server.client.completions.create(model=server.model, prompt=prompts[i], max_tokens=new,
                                                 temperature=0, extra_body={"return_token_ids": True})
            got[i] = _ids(r.choices[0])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        after = server.metrics()
    assert got == refs, [i for i, (a, b) in enumerate(zip(got, refs)) if a != b]
    print(f"largest batch {after['llmstream_batch_size_max']:.0f}, "
          f"{after['llmstream_steps_total'] - before['llmstream_steps_total']:.0f} steps")
    assert after["llmstream_batch_size_max"] >= 3, after  # the long stream and at least two of the 16 at once


def test_disconnect_frees_slot(server):
    hdr = {"Authorization": f"Bearer {KEY}"}
    wait_until(lambda: server.metrics()["llmstream_active_requests"] == 0, 30, "no request running")
    base = server.metrics()["llmstream_cancelled_requests"]
    body = {"prompt": [4, 5, 6], "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=hdr, timeout=120) as s:
        lines = s.iter_lines()  # held: a dropped line iterator closes the connection (httpx)
        n = 0
        while n < 3:
            n += next(lines).startswith("data: ")
        assert server.metrics()["llmstream_active_requests"] == 1
    # the connection is closed: the scheduler drops the row before its next step
    m = wait_until(lambda: (x := server.metrics())["llmstream_active_requests"] == 0 and x, 30, "the row freed")
    assert m["llmstream_cancelled_requests"] == base + 1
    r = server.client.completions.create(model=server.model, prompt=[4, 5, 6], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_errors(server):
    url, hdr = server.url, {"Authorization": f"Bearer {KEY}"}

    def post(path: str, body, headers=hdr, raw: bool = False):
        kw = {"content": body} if raw else {"json": body}
        return httpx.post(f"{url}{path}", headers={"content-type": "application/json", **headers}, timeout=60, **kw)

    def check(r, status: int, param=None, code=None):
        assert r.status_code == status, (r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if param is not None:
            assert err["param"] == param, err
        if code is not None:
            assert err["code"] == code, err

    check(post("/v1/chat/completions", b'{"messages": [', raw=True), 400, code="invalid_json")
    check(post("/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "model", "model_not_found")
    check(post("/v1/completions", {"prompt": [1] * (MAX_LEN + 5), "max_tokens": 1}), 400,
          code="context_length_exceeded")
    check(post("/v1/completions", {"prompt": [1, 2], "max_tokens": MAX_LEN}), 400, "max_tokens",
          "context_length_exceeded")
    check(post("/v1/completions", {"prompt": [1, 2], "max_tokens": 0}), 400, "max_tokens")
    check(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 17}), 400, "n")
    check(post("/v1/chat/completions", {"messages": "hi"}), 400, "messages")
    check(post("/v1/completions", {"prompt": [1, 2]}, headers={}), 401, code="invalid_api_key")
    check(post("/v1/completions", {"prompt": [1, 2]}, headers={"Authorization": "Bearer nope"}), 401)
    check(post("/v1/completions", b"x" * ((8 << 20) + 1), raw=True), 413)
    check(httpx.get(f"{url}/v1/nothing", timeout=30), 404)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=server.model, prompt=[1, 2], max_tokens=0)
    r = server.client.completions.create(model=server.model, prompt=[1, 2], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2  # still serving


def test_unsupported_fields_refused(server):
    url, hdr = server.url, {"Authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}]

    def refused(path: str, body: dict, param: str) -> None:
        r = httpx.post(f"{url}{path}", headers=hdr, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)

    for field in ("functions", "function_call", "service_tier", "store", "metadata", "modalities", "audio",
                  "prediction", "reasoning_effort", "web_search_options", "frobnicate", "echo", "best_of"):
        refused("/v1/chat/completions", {"messages": msgs, field: 1}, field)
    for field in ("messages", "top_logprobs", "response_format", "tools", "tool_choice", "frobnicate"):
        refused("/v1/completions", {"prompt": [1, 2], field: 1}, field)
    refused("/v1/completions", {"prompt": [1, 2], "best_of": 3}, "best_of")
    refused("/v1/completions", {"prompt": [1, 2], "suffix": "end"}, "suffix")
    refused("/v1/chat/completions", {"messages": msgs, "response_format": {"type": "xml"}}, "response_format")
    refused("/v1/chat/completions", {"messages": msgs, "response_format": {"type": "json_schema"}}, "response_format")
    refused("/v1/chat/completions", {"messages": msgs, "top_logprobs": 2}, "top_logprobs")
    refused("/v1/chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": 21}, "top_logprobs")
    refused("/v1/chat/completions", {"messages": msgs, "tool_choice": "required"}, "tool_choice")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused("/v1/chat/completions", {"messages": msgs, "tools": [tool]}, "tools")  # SmolLM2's template: no tools
    refused("/v1/chat/completions", {"messages": msgs, "logit_bias": {"99999999": 5}}, "logit_bias")
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        server.client.chat.completions.create(model=server.model, messages=msgs, extra_body={"frobnicate": True})
    # null is not given
    r = httpx.post(f"{url}/v1/completions", headers=hdr, timeout=60,
                   json={"prompt": [1, 2], "max_tokens": 1, "suffix": None, "functions": None, "user": "me"})
    assert r.status_code == 200, r.text


def _solo_logits(gen, ids: list[int]) -> torch.Tensor:
    """log-softmax of the logits of one forward over ``ids``: row i predicts token i + 1."""
    return gen.forward(torch.tensor([ids]), 0, gen.new_cache(1))[0].log_softmax(-1)


def test_logprobs_and_fields(server, gen, tok):
    c, model = server.client, server.model
    msgs = [{"role": "user", "content": QUESTION}]
    prompt = tok.encode_chat(msgs)
    r = c.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3, extra_body={"return_token_ids": True})
    ids = _ids(r.choices[0])
    lp = _solo_logits(gen, prompt + ids)
    content = r.choices[0].logprobs.content
    assert len(content) == len([t for t in ids if t not in tok.eos_ids])
    for k, e in enumerate(content):
        row = lp[len(prompt) - 1 + k]
        assert e.logprob == pytest.approx(float(row[ids[k]]), abs=2e-4)
        assert e.token == tok.decode([ids[k]]) and bytes(e.bytes).decode(errors="replace") == e.token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=2e-4)
    # completions: logprobs with echo gives the prompt's too (its first token none)
    p = tok.encode("The capital of France is")
    j = c.completions.create(model=model, prompt=p, max_tokens=3, temperature=0, logprobs=2, echo=True,
                             extra_body={"return_token_ids": True})
    out = _ids(j.choices[0])
    lpc, lps = _solo_logits(gen, p + out), j.choices[0].logprobs
    assert j.choices[0].text == tok.decode(p) + tok.decode(out) and len(lps.tokens) == len(p) + len(out)
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    for k, t in enumerate((p + out)[1:], 1):
        assert lps.token_logprobs[k] == pytest.approx(float(lpc[k - 1, t]), abs=2e-4), k
    assert lps.text_offset[:2] == [0, len(tok.decode(p[:1]))]
    # logit_bias +100 on a token makes it the greedy choice; top_k 1 and min_p 1 at temperature 1.5 sample greedily
    forced = tok.encode(" Paris")[0]
    r = c.completions.create(model=model, prompt=p, max_tokens=3, temperature=0, logit_bias={str(forced): 100},
                             extra_body={"return_token_ids": True})
    assert _ids(r.choices[0]) == [forced] * 3
    greedy = solo(gen, tok, p, 5)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = c.completions.create(model=model, prompt=p, max_tokens=5, temperature=1.5, seed=11,
                                 extra_body={"return_token_ids": True, **extra})
        assert _ids(r.choices[0]) == greedy, extra
    # the penalties, top-k and min-p: the tokens of an in-process scheduler with those settings
    kw = dict(temperature=0.9, top_p=0.95, seed=3, presence_penalty=0.5, frequency_penalty=0.7)
    extra = {"top_k": 20, "min_p": 0.02, "repetition_penalty": 1.3, "return_token_ids": True}
    r = c.completions.create(model=model, prompt=p, max_tokens=8, extra_body=extra, **kw)
    sched = Scheduler(gen, SchedulerConfig(max_batch=1))
    got = []
    sched.submit(SeqRequest(p, SamplingConfig(8, 0.9, 0.95, 3, top_k=20, min_p=0.02, presence_penalty=0.5,
                                              frequency_penalty=0.7, repetition_penalty=1.3),
                            lambda k, x: got.append(x) if k == "done" else None, tok.eos_ids))
    while sched.tick():
        pass
    assert _ids(r.choices[0]) == got[0].output_token_ids
    # n = 3: choice i is the solo run of seed + i; the prompt counted once
    r = c.completions.create(model=model, prompt=p, max_tokens=4, temperature=1.0, seed=40, n=3,
                             extra_body={"return_token_ids": True})
    want = [gen.generate(p, SamplingConfig(4, 1.0, 1.0, 40 + i), tok.eos_ids).output_token_ids for i in range(3)]
    assert [_ids(ch) for ch in sorted(r.choices, key=lambda ch: ch.index)] == want
    assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == sum(map(len, want))
    assert c.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-9")
    m = wait_until(lambda: (x := server.metrics())["llmstream_active_requests"] == 0 and x, 30, "idle")
    assert m["llmstream_batch_size"] == 0 and m["llmstream_batch_size_max"] >= 3


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 3}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}


def test_json_schema_answers(server):
    jsonschema = pytest.importorskip("jsonschema")
    c, model = server.client, server.model
    people = ["a baker", "a pilot", "a child", "a painter", "a chess player", "a sailor"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    got: list = [None] * len(people)

    def one(i: int) -> None:
        msgs = [{"role": "user", "content": f"Describe {people[i]} as JSON."}]
        if i == 0:  # one of them streamed
            chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=120, temperature=0.7,
                                                    seed=i, response_format=fmt, stream=True))
            got[i] = ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                      [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1])
        else:
            r = c.chat.completions.create(model=model, messages=msgs, max_tokens=120, temperature=0.7, seed=i,
                                          response_format=fmt)
            got[i] = (r.choices[0].message.content, r.choices[0].finish_reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(people))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    for text, reason in got:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert reason == "stop", text
    print("e.g.", got[1][0])
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give me some JSON."}],
                                  max_tokens=48, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # an object may be as long as the model likes: ended, it parses
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_serve_foreground_stops_with_pool(smol_image, tmp_path, monkeypatch):
    d = tmp_path / "pools"
    monkeypatch.setenv("LLMS_POOL_DIR", str(d))
    name = f"hf{os.getpid()}"
    err = tmp_path / "serve.err"
    with open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "serve", "--image", str(smol_image),
                                 "--name", name, "--http", "0", "--device", "cpu", "--max-seq-len", "128"],
                                stdout=fe, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        rec = wait_until(lambda: (r := records.live_server(name)) and not r.get("starting") and r or
                         (proc.poll() is not None and pytest.fail(err.read_text())), 120, "the server serves")
        r = httpx.post(f"{rec['http']}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        pool_pid = records.read_record(name)["pid"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):  # what a failed test left
            if records.pool_file(name, "record").exists():
                run_launch("pool", "stop", name, check=False, timeout=60)
    assert not _alive(pool_pid) and _port_closed(rec["http"])
    assert leftover_names(pool=name) == [] and records.read_server_record(name) is None
    assert not records.pool_file(name, "record").exists()
