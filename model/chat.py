"""Chat prompts: a model's own chat template rendered the way transformers' ``apply_chat_template`` renders it,
and the hand-written formats used where a tokenizer ships no template.

Rendering. A template (Jinja: tokenizer_config.json's ``chat_template``, a ``chat_template.jinja`` beside it, a
GGUF's ``tokenizer.chat_template``) runs in jinja2's ImmutableSandboxedEnvironment (templates from the Hub are
untrusted code) with what transformers gives it: ``trim_blocks`` and ``lstrip_blocks``, ``{% break %}`` and
``{% continue %}``, a ``{% generation %}`` block that renders its body, ``raise_exception(message)``,
``strftime_now(format)``, a ``tojson`` filter that is ``json.dumps`` with ``ensure_ascii=False`` and its
``indent``/``separators``/``sort_keys`` (jinja's own escapes HTML characters), and the variables ``messages``
(keys whose value is None left out, as transformers does, so ``content: None`` reads as absent), ``tools``
(OpenAI-style tool dicts, or None), ``documents`` (None), ``add_generation_prompt``, ``bos_token`` and
``eos_token``. An error the template raises (``raise_exception``, an undefined value, a type error on a
malformed message) becomes one ``ValueError`` line.

Injection. The template renders text, and the text is then encoded with its special-token strings read as
control tokens, so a message containing ``<|im_end|>`` would end its own turn. Before rendering, every control
token string inside the inputs (messages, tools, extra variables; keys and values) is wrapped in two private-use
characters that occur nowhere in the inputs or the template (``mark``). After rendering, ``pieces`` splits the
text at the wrapped tokens: ``[(template text, False), (injected token, True), (template text, False), ...]``;
the tokenizer encodes the first kind with control tokens recognised and the second as plain text. A lone marker
(a template's string operation cut through a wrapped token) is dropped and still splits the text, so the text
on its two sides cannot join into a control token. Inputs without control strings render as one piece: the
ids are exactly transformers'.

The fallback formats (tokenizers with no template: Meta's ``tokenizer.model``, a tokenizer.json without a
template whose vocabulary has the format's tokens) are templates here too, rendered the same way:
  llama3: <|begin_of_text|> then per message <|start_header_id|>{role}<|end_header_id|>\\n\\n{content
          stripped}<|eot_id|>, then <|start_header_id|>assistant<|end_header_id|>\\n\\n.
  chatml: per message <|im_start|>{role}\\n{content}<|im_end|>\\n, then <|im_start|>assistant\\n; a default
          system message first (``default_system``: images of tokenizer format 1 kept the one SmolLM2's template
          names) when the conversation does not start with one.

Runs in the client process (the CLI, the pool's server); owns nothing shared.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

FALLBACK_TEMPLATES = {
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "chatml": (
        "{% if default_system is not none and messages[0].role != 'system' %}"
        "<|im_start|>system\n{{ default_system }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
# The control tokens each fallback writes (the vocabulary must have them all).
FALLBACK_TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}

_PRIVATE_USE = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE))


# -------------------------------------------------------------------------------------------- environment


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes (a sandbox hardening transformers has too)."""

    def __init__(*args, **kwargs) -> None:  # jinja's signature trick: ``namespace(self=...)`` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the sandbox (cached: a server renders the same one for every request).
    Raises ``jinja2.TemplateSyntaxError`` for one jinja2 cannot parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env.from_string(template)


# ----------------------------------------------------------------------------------------------- messages


def check_messages(messages) -> list[dict]:
    """The conversation as the template sees it: each message a dict with a string ``role`` and a ``content``
    that is a string, a list of content parts (dicts) or absent/None; keys whose value is None left out.
    ``ValueError`` (one line) for anything else."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"chat messages: expected a non-empty list of {{'role': str, 'content': str}}, "
                         f"found {messages!r:.100}")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        parts_ok = isinstance(content, list) and all(isinstance(p, dict) for p in content)
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and (content is None or isinstance(content, str) or parts_ok)):
            raise ValueError(f"chat message {i}: expected {{'role': str, 'content': str, a list of parts or "
                             f"None}}, found {m!r:.100}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def check_tools(tools) -> list[dict] | None:
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"tools: expected a list of tool definitions (dicts), found {tools!r:.100}")
    return tools


# -------------------------------------------------------------------------------------------------- render


def render(template: str, messages: list[dict], control: Iterable[str], *, tools: list[dict] | None = None,
           add_generation_prompt: bool = True, variables: Mapping | None = None,
           tokens: Mapping | None = None) -> list[tuple[str, bool]]:
    """Render ``template`` over checked ``messages``; returns its pieces, ``(text, False)`` to encode with
    control tokens and ``(text, True)`` for a control token string that came from the inputs, to encode as
    plain text. ``control``: the vocabulary's control token strings; ``variables``: more template variables
    from the caller (marked like the messages); ``tokens``: ``bos_token``/``eos_token`` (not marked)."""
    inputs = {"messages": messages, "tools": tools, **(variables or {})}
    haystack = "\0".join(_strings(inputs))  # no token holds a NUL: none is found across two strings
    found = sorted({t for t in control if t and t in haystack}, key=len, reverse=True)
    if found:
        start, end = _markers(haystack + template)
        pattern = re.compile("|".join(map(re.escape, found)))
        inputs = _mark(inputs, pattern, start, end)
    try:
        text = compile_template(template).render(documents=None, add_generation_prompt=add_generation_prompt,
                                                 **{**inputs, **(tokens or {})})
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"chat template: {detail}") from None
    if not found:
        return [(text, False)]
    return _split(text, found, start, end)


def _strings(obj) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _markers(text: str) -> tuple[str, str]:
    """Two private-use characters not in ``text`` (the inputs' strings and the template): a message cannot
    forge a marker."""
    used = set(text)
    free = (chr(c) for r in _PRIVATE_USE for c in r if chr(c) not in used)
    return next(free), next(free)


def _mark(obj, pattern: re.Pattern, start: str, end: str):
    """``obj`` rebuilt with every control token string in its strings (keys and values) wrapped in markers."""
    if isinstance(obj, str):
        return pattern.sub(lambda m: start + m.group(0) + end, obj)
    if isinstance(obj, Mapping):
        return {_mark(k, pattern, start, end): _mark(v, pattern, start, end) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern, start, end) for v in obj]
    return obj


def _split(text: str, found: list[str], start: str, end: str) -> list[tuple[str, bool]]:
    """Rendered text -> pieces: a wrapped token is a plain piece, a lone marker only a break."""
    alts = "|".join(map(re.escape, found))
    parts = re.split(f"{re.escape(start)}({alts}){re.escape(end)}|[{re.escape(start + end)}]", text)
    pieces: list[tuple[str, bool]] = []
    for i, part in enumerate(parts):
        if part:  # re.split gives [text, token or None, text, ...]; None for a lone marker
            pieces.append((part, i % 2 == 1))
    return pieces
