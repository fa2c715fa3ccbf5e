"""Tool calls for the HTTP server's chat completions (runtime/services/api.py): ``tools`` go to the model's own
chat template (model/chat.py renders it, ``Tokenizer.encode_chat(messages, tools=...)``), and the model's answer
is parsed back into OpenAI ``tool_calls`` in the format its template teaches (``FORMATS``); ``tool_choice``
``required`` or a named function is enforced by constrained decoding (runtime/engine/constrained.py), so the
answer is a valid call whatever the model prefers. Torch-free.

Formats, found in the template's text (the "tool_use" one where a tokenizer has it):

    hermes   Qwen2.5, Hermes, SmolLM3...: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one
             block per call, text around them is content
    llama3   Llama-3.1/3.2 JSON: the whole answer is ``{"name": ..., "parameters": {...}}`` (after an optional
             ``<|python_tag|>``); one call
    mistral  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``

A template that shows none of them, or renders the same prompt with and without tools, cannot be given tools:
400, naming ``--chat-template FILE`` (``pool serve``/``serve``: a template that can). Assistant messages that
carry ``tool_calls`` reach the template with each call's ``arguments`` as an object (OpenAI sends a JSON string;
templates such as Llama's write it with ``tojson``), as vLLM does; ``tool`` messages pass as they are.

Streaming (``CallStream``): text goes out as content until the start of a call's marker could begin; a call is
held until it is complete, then goes out as one ``tool_calls`` delta (index, id, type, name and the arguments'
JSON); what does not parse as a call goes out as content.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from runtime.services.errors import ApiError

FORMATS = ("hermes", "llama3", "mistral")
_MARKS = {"hermes": ("<tool_call>", "</tool_call>"), "mistral": ("[TOOL_CALLS]", None)}


def template_format(tok) -> str | None:
    """The tool-call format ``tok``'s chat template teaches, or None."""
    t = (tok.chat_templates or {}) if tok is not None else {}
    text = t.get("tool_use") or t.get("default") or ""
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|start_header_id|>" in text and "parameters" in text and "tools" in text:
        return "llama3"
    return None


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates read them: a tool call's ``arguments`` JSON string parsed into an object."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                f = dict(c.get("function") or {}) if isinstance(c, dict) else {}
                if isinstance(f.get("arguments"), str):
                    try:
                        f["arguments"] = json.loads(f["arguments"])
                    except ValueError:
                        pass  # left as text: the template shows it as it came
                fixed.append({**c, "function": f} if isinstance(c, dict) else c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


@dataclass
class ToolCalls:
    """A request's tools: the definitions the template shows, the format its answer is parsed in, and the
    grammar a forced choice is decoded under (None for ``auto``)."""

    format: str
    tools: list[dict]
    choice: str  # "auto", "required" or a function's name ("none" never gets here)
    parallel: bool
    grammar: str | None = None

    def stream(self) -> CallStream:
        return CallStream(self.format, self.tools)


def parse_tools(body: dict, state) -> ToolCalls | None:
    """The request's tools, checked (400 naming the field); None without tools or with tool_choice none."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, f"parallel_tool_calls must be true or false, found {parallel!r}",
                       param="parallel_tool_calls", code="invalid_value")
    if not tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
        return None
    names = _check_tools(tools)
    if choice is None or choice == "auto":
        choice = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance((choice.get("function") or {}).get("name"), str):
        choice = choice["function"]["name"]
        if choice not in names:
            raise ApiError(400, f"tool_choice names {choice!r}, which is not among the tools ({', '.join(names)})",
                           param="tool_choice", code="invalid_value")
    else:
        raise ApiError(400, "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                            "{\"name\": NAME}}", param="tool_choice", code="invalid_value")
    fmt = state.tool_format
    if fmt is None:
        raise ApiError(400, f"tools: the model's chat template ({state.tok.source if state.tok else 'none'}) shows "
                            f"no tool-call format this server parses ({', '.join(FORMATS)}); serve with "
                            f"--chat-template FILE, a template that does", param="tools")
    calls = ToolCalls(fmt, tools, choice, parallel is not False and fmt != "llama3")
    if choice != "auto":
        calls.grammar = forced_grammar(calls, state)
    return calls


def _check_tools(tools) -> list[str]:
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    names = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                f"\"parameters\": ...}}}}", param="tools", code="invalid_value")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools",
                           code="invalid_value")
        if f["name"] in names:
            raise ApiError(400, f"tools: the name {f['name']!r} is given twice", param="tools", code="invalid_value")
        names.append(f["name"])
    return names


def encode_chat(tok, messages: list[dict], calls: ToolCalls | None) -> list[int]:
    """The prompt: the messages (and the tools) through the model's chat template. 400 when the template does
    not render the tools (it would answer without knowing them)."""
    msgs = template_messages(messages)
    if calls is None:
        return tok.encode_chat(msgs)
    with_tools = tok.encode_chat(msgs, tools=calls.tools)
    if with_tools == tok.encode_chat(msgs):
        raise ApiError(400, f"tools: the model's chat template ({tok.source}) does not render tools; serve with "
                            f"--chat-template FILE, a template that does", param="tools")
    return with_tools


# ---- forced calls: the grammar -----------------------------------------------------------------------------


def _call_schema(tool: dict, fmt: str) -> dict:
    f = tool["function"]
    args = "parameters" if fmt == "llama3" else "arguments"
    return {"type": "object", "properties": {"name": {"const": f["name"]},
                                             args: f.get("parameters") or {"type": "object"}},
            "required": ["name", args], "additionalProperties": False}


def forced_grammar(calls: ToolCalls, state) -> str:
    """The grammar of an answer that is only tool calls (of the named function, or any for ``required``)."""
    from runtime.engine.constrained import lark_string

    if state.grammars is None:
        raise ApiError(400, "tool_choice: the image has no tokenizer to constrain", param="tool_choice")
    chosen = [t for t in calls.tools if calls.choice == "required" or t["function"]["name"] == calls.choice]
    one = {"anyOf": [_call_schema(t, calls.format) for t in chosen]} if len(chosen) > 1 else \
        _call_schema(chosen[0], calls.format)
    one["x-guidance"] = {"whitespace_flexible": False}  # json.dumps's separators, as the templates show calls
    if calls.format == "hermes":
        call = f'{lark_string("<tool_call>" + chr(10))} %json {json.dumps(one)} {lark_string(chr(10) + "</tool_call>")}'
        lark = f'start: call ({lark_string(chr(10))} call)*\ncall: {call}' if calls.parallel else f"start: {call}"
    elif calls.format == "llama3":
        lark = f"start: %json {json.dumps(one)}"
    else:
        mark = state.tok.backend.token_id("[TOOL_CALLS]")
        arr = {"type": "array", "items": one, "minItems": 1, **({} if calls.parallel else {"maxItems": 1})}
        head = f"<[{mark}]>" if mark is not None else lark_string("[TOOL_CALLS]")
        lark = f"start: {head} %json {json.dumps(arr)}"
    try:
        return state.grammars.lark(lark)
    except ValueError as e:
        raise ApiError(400, f"tools: no grammar for these parameters: {e}", param="tools",
                       code="invalid_value") from None


# ---- the answer: tool calls parsed back ---------------------------------------------------------------------


def _call(obj, fmt: str, tools: list[dict]) -> dict | None:
    """An OpenAI tool call of a parsed object of ``fmt``, or None when it is not one."""
    names = {t["function"]["name"] for t in tools}
    args = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(args, (dict, str)):
        return None
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else
                         json.dumps(args, ensure_ascii=False)}}


@dataclass
class CallStream:
    """The answer's text, as it comes, split into content and tool calls (module docstring)."""

    format: str
    tools: list[dict]
    buf: str = ""  # text held back: a call being read, or what may begin a marker
    calls: list[dict] = field(default_factory=list)
    started: bool = False  # llama3: the answer's first non-space character was seen
    whole: bool = False  # llama3 / mistral: the rest of the answer is calls
    ws: str = ""  # hermes: content's trailing whitespace, held
    after_call: bool = False  # hermes: a call just ended (the whitespace after it is not content)

    def push(self, text: str) -> tuple[str, list[dict]]:
        """More text: (content to give out now, calls completed now)."""
        self.buf += text
        if self.format == "hermes":
            return self._hermes(final=False)
        return self._whole(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        """The end of the answer: the rest as content and calls."""
        if self.format == "hermes":
            return self._hermes(final=True)
        return self._whole(final=True)

    def _hermes(self, final: bool) -> tuple[str, list[dict]]:
        start, end = _MARKS["hermes"]
        out, new = "", []
        while True:
            at = self.buf.find(start)
            if at < 0:
                hold = 0 if final else max((k for k in range(1, len(start)) if self.buf.endswith(start[:k])),
                                           default=0)
                out += self._emit(self.buf[:len(self.buf) - hold])
                self.buf = self.buf[len(self.buf) - hold:]
                break
            stop = self.buf.find(end, at + len(start))
            if stop < 0:
                out += self._emit(self.buf[:at])
                self.buf = self.buf[at:]
                if final:  # a call never closed: its text is content
                    out += self._emit(self.buf)
                    self.buf = ""
                break
            call = _parse(self.buf[at + len(start):stop], "hermes", self.tools)
            if call is None:
                out += self._emit(self.buf[:stop + len(end)])
            else:
                out += self._emit(self.buf[:at])
                self.ws, self.after_call = "", True  # the whitespace around a call is not content
                new.append(call)
                self.calls.append(call)
            self.buf = self.buf[stop + len(end):]
        if final and not self.calls:
            out, self.ws = out + self.ws, ""
        return out, new

    def _emit(self, text: str) -> str:
        """Content outside calls, in order: its trailing whitespace held until more content follows (none goes out
        before a call or after the last one)."""
        if self.after_call:
            text = text.lstrip()
            if not text:
                return ""
            self.after_call = False
        text = self.ws + text
        body = text.rstrip()
        self.ws = text[len(body):]
        return body

    def _whole(self, final: bool) -> tuple[str, list[dict]]:
        """llama3 / mistral: the answer is calls if it begins with one."""
        if not self.started:
            s = self.buf.lstrip()
            if not s:
                return "", []
            mark = "[TOOL_CALLS]" if self.format == "mistral" else "<|python_tag|>"
            if len(s) < len(mark) and mark.startswith(s) and not final:
                return "", []  # may be the marker's start
            self.started = True
            self.whole = s.startswith(mark) or (self.format == "llama3" and s.startswith("{"))
            if not self.whole:
                out, self.buf = self.buf, ""
                return out, []
        if not self.whole:
            out, self.buf = self.buf, ""
            return out, []
        if not final:
            return "", []
        body, self.buf = self.buf, ""
        parsed = _parse(body, self.format, self.tools)
        if parsed is None:
            return body, []
        calls = parsed if isinstance(parsed, list) else [parsed]
        self.calls += calls
        return "", calls


def _parse(body: str, fmt: str, tools: list[dict]):
    """A call (hermes, llama3) or a list of calls (mistral) in ``body``, or None."""
    s = body.strip()
    for mark in ("<|python_tag|>", "[TOOL_CALLS]"):
        s = s.removeprefix(mark).strip()
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    if fmt == "mistral":
        items = obj if isinstance(obj, list) else [obj]
        calls = [_call(o, fmt, tools) for o in items]
        return calls if calls and all(c is not None for c in calls) else None
    return _call(obj, fmt, tools)
