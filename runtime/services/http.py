"""OpenAI-compatible HTTP on the pool's server (``launch.py pool serve NAME --http [HOST:]PORT``, ``launch.py
serve --image IMG --http PORT``): a Starlette app on uvicorn that translates requests and answers, and hands
every generation to the engine's continuous-batching scheduler (runtime/engine/scheduler.py).

Endpoints:

    GET  /v1/models             the one model served (its id: the image's name, or --model-name)
    POST /v1/chat/completions   ``messages`` through the image's chat template
    POST /v1/completions        ``prompt``: a string, or a list of token ids
    GET  /health                503 {"status": "loading"} until the model is ready, then 200 {"status": "ok"}
    GET  /metrics               Prometheus text: requests, tokens, batch size, step time, queue depth, TTFT

Fields: ``model``, ``messages`` / ``prompt``, ``max_tokens`` (``max_completion_tokens``; default: the rest of
the context), ``temperature`` (default 1, as OpenAI's; 0 is greedy), ``top_p``, ``seed``, ``stop`` (a string or
up to 4), ``n`` (1 only), ``stream`` with ``stream_options.include_usage``; ``usage`` in every answer. Two
extensions: ``"return_token_ids": true`` adds the generated ids to the choice (``token_ids``), ``"ignore_eos":
true`` generates max_tokens tokens whatever the model's end token. A streamed answer
is server-sent events (sse-starlette): ``chat.completion.chunk`` (``text_completion``) objects with one id, the
first carrying the role, the last the ``finish_reason``, then the usage chunk when asked, then ``data: [DONE]``.
Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (malformed JSON,
a field out of range, a prompt over the context), 401 a missing or wrong API key (``--api-key`` or
$LLMS_API_KEY: ``Authorization: Bearer KEY`` on /v1), 404 an unknown model or path, 413 a body over 8 MiB,
429 the scheduler's queue full (--max-queue), 503 not ready (or stopping), 504 past --request-timeout.

Threads. uvicorn's event loop runs in its own thread of the server process; the model runs in the model
thread (Scheduler.run). A request is submitted to the scheduler (bounded queue); the scheduler's events come
back through ``loop.call_soon_threadsafe`` into the request's asyncio queue (at most max_tokens + 1 events: no
unbounded memory per request). A client that disconnects (a streamed answer's generator is cancelled by
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
from runtime.engine.config import SamplingConfig

MAX_BODY = 8 << 20  # bytes of one request body
MAX_STOP = 4  # stop strings of one request (OpenAI's limit)
POLL_S = 0.25  # a plain request checks its client this often


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


class ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServiceState:
    """What the app serves with: set ready once the model is (``scheduler`` and ``tok`` then given)."""

    cfg: HttpConfig
    scheduler: object | None = None  # runtime.engine.scheduler.Scheduler
    tok: object | None = None  # model.tokenizer.Tokenizer, or None for an image without one
    ready: bool = False
    stopping: bool = False
    metrics: Metrics = field(default_factory=lambda: Metrics())

    def attach(self, scheduler, tok) -> None:
        self.scheduler, self.tok = scheduler, tok
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
        self.batch = Gauge("llmstream_batch_size", "sequences in the latest weight pass", registry=r)
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
        self._max = 0

    def bind(self, sched) -> None:
        self.queue.set_function(sched.queue_depth)
        self.active.set_function(sched.active)
        self.cancelled.set_function(lambda: sched.cancelled)

    def on_step(self, st) -> None:  # the model thread
        self.steps.inc()
        self.batch.set(st.rows)
        self._max = max(self._max, st.rows)
        self.batch_max.set(self._max)
        self.step_s.observe(st.seconds)
        self.generated.inc(st.emitted)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---- requests -> scheduler requests ----------------------------------------------------------------------------


@dataclass
class Parsed:
    prompt: list[int]
    sampling: SamplingConfig
    stops: list[str]
    stream: bool
    include_usage: bool
    token_ids: bool
    ignore_eos: bool = False  # an extension (as vLLM's): generate max_tokens whatever the model's end token


def _num(body: dict, key: str, kind, default, low=None, high=None):
    v = body.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else \
        isinstance(v, int) and not isinstance(v, bool)
    if not ok or (low is not None and v < low) or (high is not None and v > high):
        rng = f" in {low}..{high}" if high is not None else f" of at least {low}" if low is not None else ""
        raise ApiError(400, f"{key} must be {'a number' if kind is float else 'an integer'}{rng}, found {v!r}",
                       param=key, code="invalid_value")
    return kind(v)


def _messages_text(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role and a content", param="messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise ApiError(400, f"messages[{i}].content: only text parts are served", param="messages")
            c = "".join(p["text"] for p in c)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": m["role"], "content": c})
    return out


def parse_request(body, chat: bool, state: ServiceState) -> Parsed:
    """ApiError (400/404) for what cannot be served, naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    cfg, tok, vocab = state.cfg, state.tok, state.scheduler.gen.args.vocab_size
    model = body.get("model")
    if model is not None and model != cfg.model:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {cfg.model!r}",
                       param="model", code="model_not_found")
    if chat:
        msgs = _messages_text(body.get("messages"))
        if tok is None:
            raise ApiError(400, "the image has no tokenizer: use /v1/completions with a prompt of token ids",
                           param="messages")
        try:
            prompt = tok.encode_chat(msgs)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if tok is None:
                raise ApiError(400, "the image has no tokenizer: give the prompt as a list of token ids",
                               param="prompt")
            prompt = tok.encode(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            prompt = list(p)
        else:
            raise ApiError(400, "prompt must be a string or a non-empty list of token ids (one prompt: n = 1)",
                           param="prompt")
    where = "messages" if chat else "prompt"
    if not prompt:
        raise ApiError(400, f"the {where} is empty", param=where)
    n = _num(body, "n", int, 1, 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), found {n}", param="n", code="invalid_value")
    room = cfg.max_len - len(prompt)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    new = _num(body, key, int, max(room, 1), 1)
    if len(prompt) + new > cfg.max_len:
        raise ApiError(400, f"This model's maximum context length is {cfg.max_len} tokens. However, you requested "
                            f"{len(prompt) + new} tokens ({len(prompt)} in the {where}, {new} in the completion). "
                            f"Please reduce the length of the {where} or the completion.",
                       param=where if room < 1 else key, code="context_length_exceeded")
    temperature = _num(body, "temperature", float, 1.0, 0.0, 2.0)
    top_p = _num(body, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0, found 0", param="top_p", code="invalid_value")
    seed = body.get("seed")
    seed = secrets.randbits(31) if seed is None else _num(body, "seed", int, 0)
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP}", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, found {stream!r}", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return Parsed(prompt, SamplingConfig(new, temperature, top_p, seed), stops, stream,
                  bool(so.get("include_usage")), bool(body.get("return_token_ids")), bool(body.get("ignore_eos")))


class TextStream:
    """Generated ids -> text deltas: decodes the whole output (so multi-byte characters stay whole), leaves out
    the stop tokens, holds back what may be the start of a stop string, and ends at the first stop string."""

    def __init__(self, tok, stops: list[str], stop_ids: frozenset[int]) -> None:
        self.tok, self.stops, self.stop_ids = tok, stops, stop_ids
        self.ids: list[int] = []
        self.sent = ""  # text given out so far
        self.stopped = False  # a stop string was reached

    def _text(self) -> str:
        return self.tok.decode(self.ids) if self.tok is not None else " ".join(map(str, self.ids))

    def push(self, token: int) -> str:
        if token in self.stop_ids or self.stopped:
            return ""
        self.ids.append(token)
        text = self._text()
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                return self._give(text[:at])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._give(text[:len(text) - hold])

    def finish(self) -> str:
        """The rest, once generation ended."""
        if self.stopped:
            return ""
        return self._give(self._text())

    def _give(self, upto: str) -> str:
        if len(upto) <= len(self.sent):
            return ""
        d, self.sent = upto[len(self.sent):], upto
        return d


class _Bridge:
    """Scheduler events (model thread) -> this request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.q = loop, asyncio.Queue()

    def on_event(self, kind: str, payload) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            self.loop.call_soon_threadsafe(self.q.put_nowait, (kind, payload))

    async def next(self, poll_s: float | None = None) -> tuple[int | None, dict | None] | None:
        """The request's next event: (token, None), or (None, its result) when it is done; None when ``poll_s``
        passed without one. A failed request raises ApiError (504 when its timeout ended it)."""
        try:
            kind, x = await asyncio.wait_for(self.q.get(), poll_s)
        except asyncio.TimeoutError:
            return None
        if kind == "token":
            return x.token, None
        if kind == "done":
            return None, x
        raise ApiError(504 if "timeout" in str(x) else 500, str(x), "server_error")


# ---- the app -------------------------------------------------------------------------------------------------


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
        return JSONResponse(e.body(), status_code=e.status)

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

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as e:
            return error(e, "models")
        m.requests.labels("models", "200").inc()
        return JSONResponse({"object": "list", "data": [{"id": cfg.model, "object": "model",
                                                          "created": 0, "owned_by": "llmstream"}]})

    async def health(request: Request) -> Response:
        if state.ready and not state.stopping:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopping" if state.stopping else "loading"}, status_code=503)

    async def metrics(request: Request) -> Response:
        body, ctype = m.text()
        return Response(body, media_type=ctype)

    def submit(p: Parsed, bridge: _Bridge) -> SeqRequest:
        stop_ids = state.tok.eos_ids if state.tok is not None and not p.ignore_eos else frozenset()
        req = SeqRequest(p.prompt, p.sampling, bridge.on_event, stop_ids,
                         deadline=time.monotonic() + cfg.request_timeout_s)
        try:
            state.scheduler.submit(req)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                           code="rate_limit_exceeded") from None
        except ConfigError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        m.prompt_tokens.inc(len(p.prompt))
        return req

    def finish_reason(text: TextStream, res) -> str:
        return "stop" if text.stopped or res is None or res.stop_reason == "stop_token" else "length"

    def usage(p: Parsed, n: int) -> dict:
        return {"prompt_tokens": len(p.prompt), "completion_tokens": n, "total_tokens": len(p.prompt) + n}

    async def completions(request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            check_key(request)
            check_ready()
            p = parse_request(await read_json(request), chat, state)
            bridge = _Bridge(asyncio.get_running_loop())
            t0 = time.monotonic()
            req = submit(p, bridge)
        except ApiError as e:
            return error(e, endpoint)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        text = TextStream(state.tok, p.stops, req.stop_ids)
        if p.stream:
            m.requests.labels(endpoint, "200").inc()
            return EventSourceResponse(_stream(req, p, bridge, text, rid, created, chat, t0),
                                       send_timeout=cfg.send_timeout_s, ping=15)
        try:
            ids, res = [], None
            while res is None:
                ev = await bridge.next(POLL_S)
                if ev is None:  # nothing yet: is the client still there?
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                tok, res = ev
                if tok is not None:
                    if not ids:
                        m.ttft_s.observe(time.monotonic() - t0)
                    ids.append(tok)
                    text.push(tok)
                    if text.stopped:
                        break
        except ApiError as e:
            return error(e, endpoint)
        finally:
            if res is None:
                state.scheduler.cancel(req)
        content = text.sent + text.finish()
        choice = {"index": 0, "finish_reason": finish_reason(text, res), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        if p.token_ids:
            choice["token_ids"] = ids
        m.requests.labels(endpoint, "200").inc()
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": cfg.model, "choices": [choice],
                             "usage": usage(p, len(ids))})

    async def _stream(req, p: Parsed, bridge: _Bridge, text: TextStream, rid: str, created: int, chat: bool,
                      t0: float) -> AsyncIterator[dict]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, ids=None, role: bool = False) -> dict:
            if chat:
                d = {} if delta is None and not role else {"content": delta or ""}
                if role:
                    d["role"] = "assistant"
                c = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            if ids is not None and p.token_ids:
                c["token_ids"] = ids
            out = {"id": rid, "object": obj, "created": created, "model": cfg.model, "choices": [c]}
            if p.include_usage:
                out["usage"] = None
            return {"data": json.dumps(out)}

        n, res = 0, None
        try:
            if chat:
                yield chunk(None, role=True)
            while res is None:
                try:
                    tok, res = await bridge.next()
                except ApiError as err:
                    yield {"data": json.dumps(err.body())}
                    return
                if tok is not None:
                    if n == 0:
                        m.ttft_s.observe(time.monotonic() - t0)
                    n += 1
                    d = text.push(tok)
                    if d or p.token_ids:
                        yield chunk(d, ids=[tok])
                    if text.stopped:
                        break
            rest = text.finish()
            if rest:
                yield chunk(rest)
            yield chunk(None, finish_reason(text, res))
            if p.include_usage:
                yield {"data": json.dumps({"id": rid, "object": obj, "created": created, "model": cfg.model,
                                           "choices": [], "usage": usage(p, n)})}
            yield {"data": "[DONE]"}
        finally:  # done, disconnected (cancelled), or a send that timed out
            if res is None:
                state.scheduler.cancel(req)

    async def chat_completions(request: Request) -> Response:
        return await completions(request, True)

    async def text_completions(request: Request) -> Response:
        return await completions(request, False)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code if exc.status_code in (404, 405) else 400
        return error(ApiError(status, f"{request.method} {request.url.path}: {exc.detail}", param=None,
                              code="not_found" if status == 404 else "method_not_allowed"), "other")

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


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
