"""The OpenAI API's requests and answers for the HTTP server (runtime/services/http.py): a request body checked
and turned into what the scheduler runs (``parse_request`` -> ``Parsed``), and each choice's text, log-
probabilities and tool calls shaped back (``Choice``). Torch-free (the CLI imports the server before torch).

Fields served (anything else is refused with a 400 naming it; a field given as null is a field not given):

    both        model, max_tokens, temperature (default 1; 0 greedy), top_p, top_k, min_p, seed, stop, n (choices
                as separate sequences of the batch; choice i samples with seed + i), stream, stream_options
                (include_usage), presence_penalty, frequency_penalty, repetition_penalty, logit_bias, user (an id
                for the caller's own logs: no effect), return_token_ids and ignore_eos (extensions)
    chat        messages, max_completion_tokens, logprobs (bool) with top_logprobs (0..20), response_format
                (text, json_object, json_schema: constrained decoding), tools, tool_choice, parallel_tool_calls
                (runtime/services/tools.py)
    completions prompt (a string, token ids, or a list of one of them), logprobs (0..20), echo, best_of (only
                equal to n), suffix (only empty)

Log-probabilities are the model's own (log-softmax of its logits before penalties, bias, temperature and
filters: vLLM's "raw" ones), of the chosen token and the most likely ones; with ``echo`` and ``logprobs`` the
prompt's tokens' too (its prompt is then computed whole, never reused). ``usage`` counts the prompt once
whatever n, and ``prompt_tokens_details.cached_tokens`` the prompt tokens whose KV entries were reused
(runtime/engine/prefix.py).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from runtime.engine.config import SamplingConfig
from runtime.services import tools
from runtime.services.errors import ApiError

MAX_STOP = 4  # stop strings of one request (OpenAI's limit)
MAX_LOGPROBS = 20  # runtime.engine.sampling.MAX_LOGPROBS (that module needs torch)
MAX_N = 16  # choices of one request
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream",
                    "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                    "user", "return_token_ids", "ignore_eos", "logprobs"})
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}


@dataclass
class Parsed:
    """A request, checked: its prompt, sampling and what its answer must carry."""

    prompt: list[int]
    sampling: SamplingConfig
    stops: list[str]
    stream: bool
    include_usage: bool
    token_ids: bool
    ignore_eos: bool = False  # an extension (as vLLM's): generate max_tokens whatever the model's end token
    n: int = 1
    logprobs: int | None = None  # alternatives per token (None: no log-probabilities)
    echo: bool = False  # completions: the prompt's text (and log-probabilities) first
    grammar: str | None = None  # llguidance grammar the answer follows (runtime/engine/constrained.py)
    tools: object | None = None  # runtime.services.tools.ToolCalls: how its tool calls are parsed back

    def sampling_of(self, i: int) -> SamplingConfig:
        """Choice i's sampling: its own seed."""
        return self.sampling if i == 0 else SamplingConfig(**{**self.sampling.__dict__,
                                                              "seed": (self.sampling.seed + i) % (1 << 63)})


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


def _flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be true or false, found {v!r}", param=key, code="invalid_value")
    return v


def check_fields(body: dict, chat: bool) -> None:
    """400 naming the first field this server does not serve (null fields are not given)."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key, v in body.items():
        if key not in known and v is not None:
            where = "/v1/chat/completions" if chat else "/v1/completions"
            raise ApiError(400, f"{key}: this server does not serve this field on {where} (served: "
                                f"{', '.join(sorted(known))})", param=key, code="unsupported_field")


def messages_of(messages) -> list[dict]:
    """The request's messages, checked: text content (content parts joined), tool calls and results kept."""
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
        msg = {"role": m["role"], "content": c}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def _completion_prompt(body: dict, tok, vocab: int) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if tok is None:
            raise ApiError(400, "the image has no tokenizer: give the prompt as a list of token ids", param="prompt")
        return tok.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        return list(p)
    raise ApiError(400, "prompt must be a string or a non-empty list of token ids (one prompt; n for more "
                        "choices)", param="prompt")


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    lb = body.get("logit_bias") or {}
    if not isinstance(lb, dict):
        raise ApiError(400, "logit_bias must be an object of token id -> bias", param="logit_bias")
    out = []
    for k, v in lb.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            t = -1
        if not 0 <= t < vocab or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"logit_bias: token ids 0..{vocab - 1} and biases in -100..100, found {k!r}: {v!r}",
                           param="logit_bias", code="invalid_value")
        out.append((t, float(v)))
    return tuple(sorted(out))


def _sampling(body: dict, chat: bool, prompt: list[int], max_len: int, vocab: int) -> SamplingConfig:
    where = "messages" if chat else "prompt"
    room = max_len - len(prompt)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    new = _num(body, key, int, max(room, 1), 1)
    if len(prompt) + new > max_len:
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                            f"{len(prompt) + new} tokens ({len(prompt)} in the {where}, {new} in the completion). "
                            f"Please reduce the length of the {where} or the completion.",
                       param=where if room < 1 else key, code="context_length_exceeded")
    top_p = _num(body, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0, found 0", param="top_p", code="invalid_value")
    seed = body.get("seed")
    seed = secrets.randbits(31) if seed is None else _num(body, "seed", int, 0)
    return SamplingConfig(new, _num(body, "temperature", float, 1.0, 0.0, 2.0), top_p, seed,
                          top_k=_num(body, "top_k", int, 0, 0, vocab) if body.get("top_k") != -1 else 0,
                          min_p=_num(body, "min_p", float, 0.0, 0.0, 1.0),
                          presence_penalty=_num(body, "presence_penalty", float, 0.0, -2.0, 2.0),
                          frequency_penalty=_num(body, "frequency_penalty", float, 0.0, -2.0, 2.0),
                          repetition_penalty=_num(body, "repetition_penalty", float, 1.0, 0.01, 10.0),
                          logit_bias=_logit_bias(body, vocab))


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        want = _flag(body, "logprobs")
        top = _num(body, "top_logprobs", int, 0, 0, MAX_LOGPROBS)
        if body.get("top_logprobs") is not None and not want:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return top if want else None
    if body.get("logprobs") is None:
        return None
    return _num(body, "logprobs", int, 0, 0, MAX_LOGPROBS)


def response_grammar(body: dict, grammars) -> str | None:
    """The grammar of ``response_format`` (None for text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise ApiError(400, f"response_format.type must be text, json_object or json_schema, found {kind!r}",
                       param="response_format", code="invalid_value")
    if grammars is None:
        raise ApiError(400, "response_format: the image has no tokenizer to constrain", param="response_format")
    try:
        if kind == "json_object":
            return grammars.json_object()
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format", code="invalid_value")
        return grammars.json_schema(js["schema"])
    except ValueError as e:
        raise ApiError(400, f"response_format: {e}", param="response_format", code="invalid_value") from None


def parse_request(body, chat: bool, state) -> Parsed:
    """ApiError (400/404) for what cannot be served, naming the field. ``state``: the app's ServiceState."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_fields(body, chat)
    cfg, tok, vocab = state.cfg, state.tok, state.scheduler.gen.args.vocab_size
    model = body.get("model")
    if model is not None and model != cfg.model:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {cfg.model!r}",
                       param="model", code="model_not_found")
    grammar, calls = None, None
    if chat:
        msgs = messages_of(body.get("messages"))
        if tok is None:
            raise ApiError(400, "the image has no tokenizer: use /v1/completions with a prompt of token ids",
                           param="messages")
        calls = tools.parse_tools(body, state)  # None without tools
        try:
            prompt = tools.encode_chat(tok, msgs, calls)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        grammar = calls.grammar if calls is not None else None
        if body.get("response_format") is not None:
            g = response_grammar(body, state.grammars)
            if g is not None and grammar is not None:
                raise ApiError(400, "response_format and a forced tool_choice do not go together: one grammar a "
                                    "request", param="response_format")
            grammar = grammar or g
    else:
        prompt = _completion_prompt(body, tok, vocab)
        best_of, suffix = body.get("best_of"), body.get("suffix")
        if best_of is not None and best_of != _num(body, "n", int, 1, 1, MAX_N):
            raise ApiError(400, f"best_of {best_of!r}: only best_of equal to n is served (each choice is returned)",
                           param="best_of", code="invalid_value")
        if suffix not in (None, ""):
            raise ApiError(400, "suffix: insertion (text after the completion) is not served", param="suffix",
                           code="invalid_value")
    where = "messages" if chat else "prompt"
    if not prompt:
        raise ApiError(400, f"the {where} is empty", param=where)
    sampling = _sampling(body, chat, prompt, cfg.max_len, vocab)
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP}", param="stop")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    echo = False if chat else _flag(body, "echo")
    return Parsed(prompt, sampling, stops, _flag(body, "stream"), bool(so.get("include_usage")),
                  _flag(body, "return_token_ids"), _flag(body, "ignore_eos"), _num(body, "n", int, 1, 1, MAX_N),
                  _logprobs(body, chat), echo, grammar, calls)


# ---- answers ----------------------------------------------------------------------------------------------------


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


@dataclass
class Vocab:
    """What answers need of the tokenizer: text of ids, each token's text and bytes (for log-probabilities)."""

    tok: object | None
    token_bytes: list[bytes] | None = None

    def piece(self, token: int) -> str:
        return self.tok.decode([token]) if self.tok is not None else str(token)

    def bytes_of(self, token: int) -> list[int] | None:
        return list(self.token_bytes[token]) if self.token_bytes is not None else None


@dataclass
class Choice:
    """One choice of an answer as its tokens come: its text deltas (``TextStream``), its log-probabilities, and
    with tools its tool calls (runtime/services/tools.py)."""

    index: int
    p: Parsed
    vocab: Vocab
    stop_ids: frozenset[int]
    text: TextStream = field(init=False)
    ids: list[int] = field(default_factory=list)
    result: object | None = None  # the GenerationResult once done
    prompt_lps: list | None = None  # [None, Sampled, ...] (echo with logprobs)
    calls: object | None = None  # tools.CallStream
    base: int = 0  # the echoed prompt's length in characters (offsets of the completion's log-probabilities)
    opened: bool = False  # streamed: the echo went out
    closed: bool = False  # streamed: its last chunk went out

    def __post_init__(self) -> None:
        self.text = TextStream(self.vocab.tok, self.p.stops, self.stop_ids)
        if self.p.tools is not None:
            self.calls = self.p.tools.stream()
        if self.p.echo:
            self.base = len(self.echo_entries()[0])

    @property
    def done(self) -> bool:
        return self.result is not None or self.text.stopped

    def push(self, s) -> tuple[str, list]:
        """A chosen token (runtime.engine.sampling.Sampled): (the text it gives out now, its log-probability
        entries)."""
        if self.text.stopped:
            return "", []
        offset = len(self.text._text())  # where its text begins
        self.ids.append(s.token)
        delta = self.text.push(s.token)
        lps = [(s, offset)] if self.p.logprobs is not None and s.logprob is not None and \
            s.token not in self.stop_ids else []
        return delta, lps

    def finish(self) -> str:
        return self.text.finish()

    def finish_reason(self) -> str:
        res = self.result
        if self.calls is not None and self.calls.calls:
            return "tool_calls"
        return "stop" if self.text.stopped or res is None or res.stop_reason in ("stop_token", "grammar") \
            else "length"

    # ---- log-probabilities, in OpenAI's shapes -------------------------------------------------------------

    def chat_logprobs(self, entries: list) -> dict | None:
        if self.p.logprobs is None:
            return None
        v = self.vocab
        return {"content": [{"token": v.piece(s.token), "logprob": s.logprob, "bytes": v.bytes_of(s.token),
                             "top_logprobs": [{"token": v.piece(t), "logprob": lp, "bytes": v.bytes_of(t)}
                                              for t, lp in s.top]} for s, _ in entries]}

    def completion_logprobs(self, entries: list, base: int = 0) -> dict | None:
        """``entries``: (Sampled, text offset) pairs; ``base``: the length of the text before the choice's."""
        if self.p.logprobs is None:
            return None
        v = self.vocab
        return {"tokens": [v.piece(s.token) for s, _ in entries],
                "token_logprobs": [s.logprob for s, _ in entries],
                "top_logprobs": [{v.piece(t): lp for t, lp in s.top} if s.logprob is not None else None
                                 for s, _ in entries],
                "text_offset": [base + off for _, off in entries]}

    def echo_entries(self) -> tuple[str, list]:
        """The prompt's text and, with logprobs, its entries (the first token has none)."""
        v, prompt = self.vocab, self.p.prompt
        text = v.tok.decode(prompt) if v.tok is not None else " ".join(map(str, prompt))
        if self.p.logprobs is None or self.prompt_lps is None:
            return text, []
        entries, off = [], 0
        for k, t in enumerate(prompt):
            s = self.prompt_lps[k]
            entries.append((s, off) if s is not None else (_First(t), off))
            off = len(v.tok.decode(prompt[:k + 1])) if v.tok is not None else off + 1
        return text, entries

    def usage_tokens(self) -> int:
        return len(self.ids)


class _First:
    """The prompt's first token in an echo's log-probabilities: none of its own."""

    def __init__(self, token: int) -> None:
        self.token, self.logprob, self.top = token, None, ()


def usage(p: Parsed, choices: list[Choice], reqs: list) -> dict:
    """``usage``: the prompt counted once, every choice's tokens, the prompt tokens the first choice reused
    (``SeqRequest.cached``, set when it was admitted)."""
    n = sum(c.usage_tokens() for c in choices)
    cached = reqs[0].cached if reqs else 0
    return {"prompt_tokens": len(p.prompt), "completion_tokens": n, "total_tokens": len(p.prompt) + n,
            "prompt_tokens_details": {"cached_tokens": cached}}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
