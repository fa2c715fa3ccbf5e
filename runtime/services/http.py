"""OpenAI-compatible HTTP on the pool's server (``launch.py pool serve NAME --http [HOST:]PORT``, ``launch.py
serve --image IMG --http PORT``): a Starlette app on uvicorn that translates requests and answers, and hands
every generation to the engine's continuous-batching scheduler (runtime/engine/scheduler.py).

Endpoints:

    GET  /v1/models             the one model served (its id: the image's name, or --model-name)
    GET  /v1/models/{id}        that model (404 for another id)
    POST /v1/chat/completions   ``messages`` through the image's chat template (or --chat-template's)
    POST /v1/completions        ``prompt``: a string, or a list of token ids
    GET  /health                503 {"status": "loading"} until the model is ready, then 200 {"status": "ok"}
    GET  /metrics               Prometheus text: requests, tokens, batch size (0 while idle), step time, queue
                                depth, TTFT, prompt tokens computed and reused, speculative passes

The fields served, log-probabilities, ``n`` and ``usage``: runtime/services/api.py (anything else is a 400 naming
the field); tools: runtime/services/tools.py; ``response_format`` and forced tool calls are decoded under a
grammar (runtime/engine/constrained.py). A streamed answer is server-sent events (sse-starlette):
``chat.completion.chunk`` (``text_completion``) objects with one id, the first of each choice carrying the
role, its last its ``finish_reason`` (``tool_calls`` deltas before it), then the usage chunk when asked, then
``data: [DONE]``. Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 bad input
(malformed JSON, an unknown field, a field out of range, a prompt over the context), 401 a missing or wrong API
key (``--api-key`` or $LLMS_API_KEY: ``Authorization: Bearer KEY`` on /v1), 404 an unknown model or path, 413 a
body over 8 MiB, 429 the scheduler's queue full (--max-queue; ``Retry-After: 1``), 503 not ready (or stopping),
504 past --request-timeout.

Threads. uvicorn's event loop runs in its own thread of the server process; the model runs in the model
thread (Scheduler.run). A request's n choices are submitted to the scheduler (bounded queue) as n sequences;
their events come back through ``loop.call_soon_threadsafe`` into the request's asyncio queue (at most n x
(max_tokens + 2) events: no unbounded memory per request). A request is parsed (chat template, grammar) in a
worker thread, off the event loop. A client that disconnects (a streamed answer's generator is cancelled by
sse-starlette; a plain one polls ``request.is_disconnected()``) cancels its request: the scheduler frees its
row before its next step. A stream whose reader stops reading for --send-timeout seconds is dropped the same
way (backpressure: its events wait in its queue meanwhile, bounded by its max_tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.errors import ConfigError
from runtime.services.api import Choice, Parsed, Vocab, dumps, parse_request, usage
from runtime.services.errors import ApiError

MAX_BODY = 8 << 20  # bytes of one request body
POLL_S = 0.25  # a plain request checks its client this often
RETRY_AFTER_S = 1  # a 429's Retry-After


def parse_listen(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); host 127.0.0.1 unless given. ConfigError names
    the value and the range."""
    host, port = "127.0.0.1", text
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\w+)|([^:\s]+):(\w+)|(\w+)", text.strip())
    if not m:
        raise ConfigError(f"--http {text!r}: expected [HOST:]PORT, e.g. 8000 or 127.0.0.1:8000")
    if m.group(1) is not None:
        host, port = m.group(1), m.group(2)
    elif m.group(3) is not None:
        host, port = m.group(3), m.group(4)
    else:
        port = m.group(5)
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise ConfigError(f"--http {text!r}: the port must be a number in 0..65535 (0: any free port), found {port!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
            raise ConfigError(f"--http {text!r}: the host must be an IP address or a host name, found {host!r}") \
                from None
    return host, p


def bind_listen(host: str, port: int) -> socket.socket:
    """The listening TCP socket of ``--http`` (bound before the model loads: /health answers while it does);
    ConfigError naming the address when it cannot be bound."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        s = socket.socket(info[0], socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"--http {host}:{port}: cannot resolve the host ({e})") from None
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(info[4])
        s.listen(256)
    except OSError as e:
        s.close()
        raise ConfigError(f"--http {host}:{port}: cannot listen there ({e.strerror or e})") from None
    return s


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP front's settings (``pool serve`` flags)."""

    model: str  # the id /v1/models lists
    max_len: int  # prompt + new tokens of a request
    api_key: str | None = None
    request_timeout_s: float = 600.0
    send_timeout_s: float = 30.0


@dataclass
class ServiceState:
    """What the app serves with: set ready once the model is (``attach``)."""

    cfg: HttpConfig
    scheduler: object | None = None  # runtime.engine.scheduler.Scheduler
    tok: object | None = None  # model.tokenizer.Tokenizer, or None for an image without one
    ready: bool = False
    stopping: bool = False
    metrics: Metrics = field(default_factory=lambda: Metrics())
    vocab: Vocab = field(default_factory=lambda: Vocab(None))
    grammars: object | None = None  # runtime.engine.constrained.Grammars (None without a tokenizer)
    tool_format: str | None = None  # runtime/services/tools.py: the chat template's tool-call format

    def attach(self, scheduler, tok) -> None:
        """Serve with ``scheduler`` and tokenizer ``tok``: its vocabulary's bytes (log-probabilities), its
        grammars (constrained decoding) and its template's tool-call format are prepared here, once."""
        from runtime.engine.constrained import Grammars
        from runtime.format.tokens import token_bytes
        from runtime.services.tools import template_format

        self.scheduler, self.tok = scheduler, tok
        if tok is not None:
            self.vocab = Vocab(tok, token_bytes(tok))
            self.grammars = Grammars(tok)
            self.tool_format = template_format(tok)
        self.metrics.bind(scheduler)
        scheduler.observer = self.metrics.on_step
        self.ready = True


class Metrics:
    """The Prometheus series, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmstream_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.prompt_tokens = Counter("llmstream_prompt_tokens", "prompt tokens of requests admitted", registry=r)
        self.generated = Counter("llmstream_generation_tokens", "tokens generated", registry=r)
        self.steps = Counter("llmstream_steps", "weight passes of the scheduler", registry=r)
        self.batch = Gauge("llmstream_batch_size", "sequences in the latest weight pass (0 while idle)", registry=r)
        self.batch_max = Gauge("llmstream_batch_size_max", "the most sequences one weight pass has served",
                               registry=r)
        self.step_s = Histogram("llmstream_step_seconds", "time of one weight pass (all rows)", registry=r,
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.ttft_s = Histogram("llmstream_time_to_first_token_seconds", "request received -> first token",
                                registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.queue = Gauge("llmstream_queue_depth", "requests waiting for a row", registry=r)
        self.active = Gauge("llmstream_active_requests", "requests holding a row", registry=r)
        self.cancelled = Gauge("llmstream_cancelled_requests", "requests cancelled (client gone, stop string)",
                               registry=r)
        self.prefilled = Gauge("llmstream_prefill_tokens", "prompt tokens computed since the start", registry=r)
        self.cached = Gauge("llmstream_prefix_cached_tokens", "prompt tokens whose KV entries were reused instead of "
                            "computed, since the start (runtime/engine/prefix.py)", registry=r)
        self.spec_passes = Gauge("llmstream_speculative_passes", "passes that verified a draft's token tree",
                                 registry=r)
        self.spec_tokens = Gauge("llmstream_speculative_tokens", "tokens those passes gave", registry=r)
        self._max = 0

    def bind(self, sched) -> None:
        self.queue.set_function(sched.queue_depth)
        self.active.set_function(sched.active)
        self.cancelled.set_function(lambda: sched.cancelled)
        self.batch.set_function(sched.batch_size)  # 0 while idle
        self.prefilled.set_function(lambda: sched.prefilled_tokens)
        self.cached.set_function(lambda: sched.cached_tokens)
        self.spec_passes.set_function(lambda: sched.spec_passes)
        self.spec_tokens.set_function(lambda: sched.spec_tokens)

    def on_step(self, st) -> None:  # the model thread
        self.steps.inc()
        self._max = max(self._max, st.rows)
        self.batch_max.set(self._max)
        self.step_s.observe(st.seconds)
        self.generated.inc(st.emitted)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---- the app -------------------------------------------------------------------------------------------------


class _Bridge:
    """Scheduler events (model thread) of a request's choices -> its asyncio queue, tagged with the choice."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.q = loop, asyncio.Queue()

    def listener(self, index: int):
        def on_event(kind: str, payload) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                self.loop.call_soon_threadsafe(self.q.put_nowait, (index, kind, payload))
        return on_event

    async def next(self, poll_s: float | None = None) -> tuple[int, str, object] | None:
        """The next event: (choice, kind, payload); None when ``poll_s`` passed without one. A failed request
        raises ApiError (504 when its timeout ended it)."""
        try:
            i, kind, x = await asyncio.wait_for(self.q.get(), poll_s)
        except asyncio.TimeoutError:
            return None
        if kind == "error":
            raise ApiError(504 if "timeout" in str(x) else 500, str(x), "server_error")
        return i, kind, x


class _Answer:
    """One request's choices while their events come (plain and streamed answers alike)."""

    def __init__(self, p: Parsed, state: ServiceState, reqs: list, stop_ids: frozenset[int]) -> None:
        self.p, self.state, self.reqs = p, state, reqs
        self.choices = [Choice(i, p, state.vocab, stop_ids) for i in range(p.n)]
        self.first_token = False

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)

    def event(self, i: int, kind: str, x) -> list:
        """Apply a scheduler event; a token's (text, log-probability entries); a choice that reached a stop string
        is cancelled."""
        c = self.choices[i]
        if kind == "prompt_logprobs":
            c.prompt_lps = x
        elif kind == "done":
            c.result = x
        elif kind == "token":
            out = c.push(x)
            if c.text.stopped and c.result is None:
                self.state.scheduler.cancel(self.reqs[i])
            return out
        return ["", []]

    def cancel_open(self) -> None:
        for c, r in zip(self.choices, self.reqs):
            if c.result is None:
                self.state.scheduler.cancel(r)


def build_app(state: ServiceState):
    from sse_starlette import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from runtime.engine.scheduler import QueueFull, SeqRequest

    cfg, m = state.cfg, state.metrics

    def error(e: ApiError, endpoint: str) -> JSONResponse:
        m.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.startswith("Bearer "):
            raise ApiError(401, "You didn't provide an API key: Authorization: Bearer KEY", code="invalid_api_key")
        if not secrets.compare_digest(got[len("Bearer "):].encode(), cfg.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_ready() -> None:
        if state.stopping:
            raise ApiError(503, "the server is stopping", "server_error", code="unavailable")
        if not state.ready:
            raise ApiError(503, "the model is loading", "server_error", code="loading")

    async def read_json(request: Request):
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > MAX_BODY:
            raise ApiError(413, f"the request body has {n} bytes, more than {MAX_BODY}", code="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def model_card() -> dict:
        return {"id": cfg.model, "object": "model", "created": 0, "owned_by": "llmstream"}

    async def models(request: Request) -> Response:
        try:
            check_key(request)
            mid = request.path_params.get("model")
            if mid is not None and mid != cfg.model:
                raise ApiError(404, f"The model {mid!r} does not exist; this server serves {cfg.model!r}",
                               param="model", code="model_not_found")
        except ApiError as e:
            return error(e, "models")
        m.requests.labels("models", "200").inc()
        return JSONResponse(model_card() if mid is not None else {"object": "list", "data": [model_card()]})

    async def health(request: Request) -> Response:
        if state.ready and not state.stopping:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopping" if state.stopping else "loading"}, status_code=503)

    async def metrics(request: Request) -> Response:
        body, ctype = m.text()
        return Response(body, media_type=ctype)

    def submit(p: Parsed, bridge: _Bridge, stop_ids: frozenset[int]) -> list:
        """Every choice as a sequence of the batch; 429 (Retry-After) if the queue cannot take them all."""
        reqs, deadline = [], time.monotonic() + cfg.request_timeout_s
        try:
            for i in range(p.n):
                req = SeqRequest(p.prompt, p.sampling_of(i), bridge.listener(i), stop_ids, deadline,
                                 logprobs=p.logprobs, prompt_logprobs=p.logprobs if p.echo else None,
                                 constraint=state.grammars.matcher(p.grammar) if p.grammar else None)
                state.scheduler.submit(req)
                reqs.append(req)
        except QueueFull as e:
            for r in reqs:
                state.scheduler.cancel(r)
            raise ApiError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ConfigError as e:
            for r in reqs:
                state.scheduler.cancel(r)
            raise ApiError(400, str(e), code="invalid_value") from None
        m.prompt_tokens.inc(len(p.prompt))
        return reqs

    async def completions(request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            check_key(request)
            check_ready()
            body = await read_json(request)
            p = await asyncio.to_thread(parse_request, body, chat, state)  # templates, grammars: off the loop
            bridge = _Bridge(asyncio.get_running_loop())
            t0 = time.monotonic()
            stop_ids = state.tok.eos_ids if state.tok is not None and not p.ignore_eos else frozenset()
            ans = _Answer(p, state, submit(p, bridge, stop_ids), stop_ids)
        except ApiError as e:
            return error(e, endpoint)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        shape = _Shape(rid, int(time.time()), cfg.model, chat, p)
        if p.stream:
            m.requests.labels(endpoint, "200").inc()
            return EventSourceResponse(_stream(ans, bridge, shape, t0), send_timeout=cfg.send_timeout_s, ping=15)
        entries: list[list] = [[] for _ in range(p.n)]
        try:
            while not ans.done:
                ev = await bridge.next(POLL_S)
                if ev is None:  # nothing yet: is the client still there?
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                i, kind, x = ev
                if ans.choices[i].text.stopped:
                    continue
                entries[i] += ans.event(i, kind, x)[1]
                if kind == "token" and not ans.first_token:
                    ans.first_token = True
                    m.ttft_s.observe(time.monotonic() - t0)
        except ApiError as e:
            return error(e, endpoint)
        finally:
            ans.cancel_open()
        m.requests.labels(endpoint, "200").inc()
        return Response(dumps(shape.whole(ans, entries)), media_type="application/json")

    async def _stream(ans: _Answer, bridge: _Bridge, shape: _Shape, t0: float) -> AsyncIterator[dict]:
        try:
            if shape.chat:
                for c in ans.choices:
                    yield shape.chunk(c, {"role": "assistant", "content": ""})
            while not ans.done:
                try:
                    i, kind, x = await bridge.next()
                except ApiError as err:
                    yield {"data": json.dumps(err.body())}
                    return
                c = ans.choices[i]
                if c.closed:  # it reached a stop string: what its cancelled sequence still sent is not used
                    continue
                delta, ent = ans.event(i, kind, x)
                if ans.p.echo and not c.opened:  # the prompt first (its log-probabilities came first, if asked)
                    c.opened = True
                    text, pe = c.echo_entries()
                    yield shape.chunk(c, text, pe, base=0)
                if kind == "token":
                    if not ans.first_token:
                        ans.first_token = True
                        m.ttft_s.observe(time.monotonic() - t0)
                    for ch in shape.deltas(c, delta, ent, [x.token]):
                        yield ch
                if c.done:
                    c.closed = True
                    for ch in shape.deltas(c, c.finish(), [], None, final=True):
                        yield ch
                    yield shape.chunk(c, None, reason=c.finish_reason())
            if ans.p.include_usage:
                yield shape.usage_chunk(ans)
            yield {"data": "[DONE]"}
        finally:  # done, disconnected (cancelled), or a send that timed out
            ans.cancel_open()

    async def chat_completions(request: Request) -> Response:
        return await completions(request, True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, False)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code if exc.status_code in (404, 405) else 400
        return error(ApiError(status, f"{request.method} {request.url.path}: {exc.detail}", param=None,
                              code="not_found" if status == 404 else "method_not_allowed"), "other")

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{model:path}", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


class _Shape:
    """An answer's JSON: whole (plain) or as chunks (streamed), chat or completions."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, p: Parsed) -> None:
        self.rid, self.created, self.model, self.chat, self.p = rid, created, model, chat, p
        self.obj = "chat.completion.chunk" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, c: Choice, delta, entries=(), reason: str | None = None, ids=None, base: int | None = None) \
            -> dict:
        """One chunk of choice ``c``: ``delta`` a text (completions) or a delta dict (chat); ``base``: the text
        before the completion's in its log-probabilities' offsets (default: the echoed prompt's)."""
        if self.chat:
            d = delta if isinstance(delta, dict) else ({} if delta is None else {"content": delta})
            ch = {"index": c.index, "delta": d, "finish_reason": reason,
                  "logprobs": c.chat_logprobs(entries) if entries else None}
        else:
            ch = {"index": c.index, "text": delta or "", "finish_reason": reason,
                  "logprobs": c.completion_logprobs(entries, c.base if base is None else base) if entries else None}
        if ids is not None and self.p.token_ids:
            ch["token_ids"] = ids
        out = {**self._head(self.obj), "choices": [ch]}
        if self.p.include_usage:
            out["usage"] = None
        return {"data": dumps(out)}

    def deltas(self, c: Choice, text: str, entries: list, ids, final: bool = False) -> list[dict]:
        """The chunks of new text of choice ``c``: content (its log-probabilities with it), then any tool calls
        it completed."""
        out, calls = [], []
        if c.calls is not None:
            text, calls = c.calls.push(text) if not final else _joined(c.calls.push(text), c.calls.finish())
        if text or entries or (ids is not None and self.p.token_ids):
            out.append(self.chunk(c, text, entries, ids=ids))
        for call in calls:
            k = c.calls.calls.index(call)
            out.append(self.chunk(c, {"tool_calls": [{"index": k, **call}]}))
        return out

    def usage_chunk(self, ans: _Answer) -> dict:
        return {"data": dumps({**self._head(self.obj), "choices": [], "usage": usage(self.p, ans.choices, ans.reqs)})}

    def whole(self, ans: _Answer, entries: list[list]) -> dict:
        choices = []
        for c in ans.choices:
            text = c.text.sent + c.finish()
            calls = []
            if c.calls is not None:
                text, calls = _joined(c.calls.push(text), c.calls.finish())
            ch = {"index": c.index, "finish_reason": c.finish_reason()}
            if self.chat:
                msg = {"role": "assistant", "content": text if text or not calls else None}
                if calls:
                    msg["tool_calls"] = calls
                ch["message"] = msg
                ch["logprobs"] = c.chat_logprobs(entries[c.index])
            else:
                lp_entries = entries[c.index]
                if self.p.echo:
                    prompt_text, prompt_entries = c.echo_entries()
                    text = prompt_text + text
                    lp_entries = prompt_entries + [(s, off + len(prompt_text)) for s, off in lp_entries]
                ch["text"] = text
                ch["logprobs"] = c.completion_logprobs(lp_entries)
            if self.p.token_ids:
                ch["token_ids"] = list(c.ids)
            choices.append(ch)
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage(self.p, ans.choices, ans.reqs)}


def _joined(a: tuple[str, list], b: tuple[str, list]) -> tuple[str, list]:
    return a[0] + b[0], a[1] + b[1]

class HttpServer:
    """uvicorn serving ``build_app(state)`` on an already bound socket, in a thread of its own."""

    def __init__(self, state: ServiceState, sock: socket.socket) -> None:
        import uvicorn

        self.state, self.sock = state, sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        config = uvicorn.Config(build_app(state), log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="http",
                                       daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.url} did not start within {timeout_s:.0f} s")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.state.stopping = True
        self.server.should_exit = True
        self.thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self.sock.close()
