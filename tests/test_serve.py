"""``launch.py serve`` as agents and editors use it (issue 30), on the CPU with the fp32 SmolLM2 image: one foreground
server for the module, ``--http 0 --draft ngram --max-batch 2 --chat-template`` Qwen2.5's template (SmolLM2's own
renders no tools; both are chatml), through the official ``openai`` client, its Unix socket and raw HTTP.

  test_call_streams_parse              tools.CallStream alone: each format's calls (hermes blocks, Llama-3.1 JSON,
      Mistral's [TOOL_CALLS]) parsed from text split at every position, content around them kept, what does not
      parse left as content.
  test_tool_call_round_trip            the template renders the tools (the prompt is the in-process template's
      with them); a named tool_choice and a required one (two tools) yield a call whose arguments validate against
      the tool's parameters, plain and streamed (deltas); its result sent back renders as the template says.
  test_shared_system_prompt_reused     a 1000-token system prompt: the second request prefills only its new tokens
      (usage's cached_tokens and the server's prefill counter say so) and gives the greedy tokens of a fresh run;
      alone in the batch it decodes from the draft's trees (--draft with --http).
  test_socket_and_http_share_a_batch   a socket request (run --attach's protocol) joins an HTTP stream's batch.
  test_port_held_names_its_pool        a second serve on the port: refused, naming the pool and pool stop.
  test_sigkill_leaves_nothing          SIGKILL of launch.py serve: its server and pool stop by themselves within
      seconds, the port is free, no process, record, log, lock, socket or /dev/shm name is left. (Last: it ends
      the module's server.)
About a minute on 2 cores.
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
import time

import pytest
from conftest import ROOT, assert_user_error, long_stream, run_launch, scrape_metrics, wait_until

from runtime.engine.config import SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.tokens import image_tokenizer, with_chat_template
from runtime.ipc import records
from runtime.ipc.shm import leftover_names
from runtime.services.tools import CallStream

openai = pytest.importorskip("openai")

MAX_LEN = 1280
QWEN = ROOT / "tests" / "data" / "chat_templates" / "Qwen2.5-7B-Instruct.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}


def alive(pid: int) -> bool:
    from runtime.ipc.procs import pid_alive

    return pid_alive(pid)


def port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) != 0


# ---- tool-call parsing alone ----------------------------------------------------------------------------------


def _split_everywhere(fmt: str, text: str, tools: list[dict]):
    """(content, calls) of ``text`` fed whole, and fed in two pieces at every position: all must agree."""
    results = []
    for cut in [None, *range(1, len(text))]:
        cs = CallStream(fmt, tools)
        parts = [text] if cut is None else [text[:cut], text[cut:]]
        content, calls = "", []
        for piece in parts:
            c, k = cs.push(piece)
            content, calls = content + c, calls + k
        c, k = cs.finish()
        results.append((content + c, [(x["function"]["name"], json.loads(x["function"]["arguments"]))
                                      for x in calls + k]))
    assert all(r == results[0] for r in results), (fmt, text)
    return results[0]


def test_call_streams_parse():
    tools = [WEATHER, TIME]
    args = {"city": "Paris", "unit": "celsius"}
    text = (f'Let me check.\n<tool_call>\n{json.dumps({"name": "get_weather", "arguments": args})}\n</tool_call>\n'
            f'<tool_call>\n{json.dumps({"name": "get_time", "arguments": {"zone": "CET"}})}\n</tool_call>')
    assert _split_everywhere("hermes", text, tools) == ("Let me check.", [("get_weather", args),
                                                                           ("get_time", {"zone": "CET"})])
    bad = 'Hmm <tool_call>{"name": "nope", "arguments": {}}</tool_call> and <tool_call>{broken'
    assert _split_everywhere("hermes", bad, tools) == (bad, [])
    assert _split_everywhere("hermes", "no calls, a < sign", tools) == ("no calls, a < sign", [])
    call = json.dumps({"name": "get_weather", "parameters": args})
    assert _split_everywhere("llama3", call, tools) == ("", [("get_weather", args)])
    assert _split_everywhere("llama3", "<|python_tag|>" + call, tools) == ("", [("get_weather", args)])
    assert _split_everywhere("llama3", "It is sunny {really}", tools) == ("It is sunny {really}", [])
    calls = json.dumps([{"name": "get_weather", "arguments": args}, {"name": "get_time", "arguments": {"zone": "X"}}])
    assert _split_everywhere("mistral", "[TOOL_CALLS]" + calls, tools) == \
        ("", [("get_weather", args), ("get_time", {"zone": "X"})])
    assert _split_everywhere("mistral", "[TOOL", tools) == ("[TOOL", [])


# ---- the module's server ----------------------------------------------------------------------------------------


class Serve:
    def __init__(self, proc: subprocess.Popen, name: str, rec: dict, err) -> None:
        self.proc, self.name, self.rec, self.err = proc, name, rec, err
        self.url = rec["http"]
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)
        self.model = self.client.models.list().data[0].id

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.url)


@pytest.fixture(scope="module")
def served(smol_image, tmp_path_factory):
    d = tmp_path_factory.mktemp("servepools")
    old = os.environ.get("LLMS_POOL_DIR")
    os.environ["LLMS_POOL_DIR"] = str(d)
    name = f"sv{os.getpid()}"
    err = d.parent / f"{name}.err"
    with open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "serve", "--image", str(smol_image),
                                 "--name", name, "--http", "0", "--device", "cpu", "--max-seq-len", str(MAX_LEN),
                                 "--max-batch", "2", "--chat-template", str(QWEN), "--draft", "ngram"],
                                stdout=fe, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        rec = wait_until(lambda: (r := records.live_server(name)) and not r.get("starting") and r or
                         (proc.poll() is not None and pytest.fail(err.read_text())), 180, "the server serves")
        yield Serve(proc, name, rec, err)
    finally:
        if proc.poll() is None:  # the SIGKILL test did not run
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):  # what a failed test left
            if records.pool_file(name, "record").exists():
                run_launch("pool", "stop", name, check=False, timeout=60)
        if old is None:
            os.environ.pop("LLMS_POOL_DIR", None)
        else:
            os.environ["LLMS_POOL_DIR"] = old


@pytest.fixture(scope="module")
def qwen_tok(smol_image):
    return with_chat_template(image_tokenizer(Image.open(smol_image), required=True), str(QWEN))


@pytest.fixture(scope="module")
def gen(smol_image):
    """The in-process reference: a fresh run (one compute thread, beside the server's)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Generator(InMemoryWeights(Image.open(smol_image), "cpu", quiet=True), MAX_LEN)
    finally:
        torch.set_num_threads(threads)


def _arguments_valid(call, tool: dict) -> dict:
    jsonschema = pytest.importorskip("jsonschema")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_tool_call_round_trip(served, qwen_tok):
    c, model = served.client, served.model
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, TIME], tool_choice=named,
                                  parallel_tool_calls=False, max_tokens=80, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = _arguments_valid(call, WEATHER)
    # the template rendered the tools: the prompt is its in-process rendering with them, longer than without
    with_tools = qwen_tok.encode_chat(msgs, tools=[WEATHER, TIME])
    assert r.usage.prompt_tokens == len(with_tools) > len(qwen_tok.encode_chat(msgs))
    # streamed: the call comes as a tool_calls delta; required with two tools: a call to one of them
    chunks = list(c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True))
    deltas = [d for x in chunks if x.choices for d in (x.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and [x.choices[0].finish_reason for x in chunks if x.choices][-1] == "tool_calls"
    d = deltas[0]
    assert d.index == 0 and d.function.name in ("get_weather", "get_time")
    _arguments_valid(d, WEATHER if d.function.name == "get_weather" else TIME)
    # the result goes back: the template renders the call (its arguments as an object) and the tool's answer
    convo = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    r2 = c.chat.completions.create(model=model, messages=convo, tools=[WEATHER], max_tokens=24, temperature=0)
    shown = convo[:1] + [{"role": "assistant", "tool_calls": [{"type": "function", "id": call.id, "function": {
        "name": "get_weather", "arguments": args}}]}, convo[2]]
    want = qwen_tok.encode_chat(shown, tools=[WEATHER])
    assert r2.usage.prompt_tokens == len(want)
    assert "<tool_response>" in qwen_tok.decode(want) and r2.choices[0].finish_reason in ("stop", "length",
                                                                                         "tool_calls")


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_shared_system_prompt_reused(served, qwen_tok, gen):
    rnd = random.Random(44)
    print("seed 44")
    words = ["always", "answer", "briefly", "cite", "sources", "when", "asked", "about", "history", "science",
             "and", "never", "invent", "facts", "or", "names"]
    system = " ".join(rnd.choice(words) for _ in range(1000))
    convo = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]  # noqa: E731
    a_ids, b_ids = qwen_tok.encode_chat(convo("Who was Ada Lovelace?")), qwen_tok.encode_chat(convo("What is 2+2?"))
    assert len(a_ids) > 1000, len(a_ids)
    c, model = served.client, served.model
    wait_until(lambda: served.metrics()["llmstream_active_requests"] == 0, 60, "idle")
    c.chat.completions.create(model=model, messages=convo("Who was Ada Lovelace?"), max_tokens=4, temperature=0)
    before = served.metrics()
    r = c.chat.completions.create(model=model, messages=convo("What is 2+2?"), max_tokens=16, temperature=0,
                                  extra_body={"return_token_ids": True})
    after = served.metrics()
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert r.usage.prompt_tokens == len(b_ids) and cached == _lcp(a_ids, b_ids) > 1000 - 60, cached
    assert after["llmstream_prefill_tokens"] - before["llmstream_prefill_tokens"] == len(b_ids) - cached
    assert (r.choices[0].model_extra or {})["token_ids"] == \
        gen.generate(b_ids, SamplingConfig(16), qwen_tok.eos_ids).output_token_ids  # a fresh run's
    assert after["llmstream_speculative_passes"] > before["llmstream_speculative_passes"]  # alone: trees


def test_socket_and_http_share_a_batch(served):
    with long_stream(served.url, MAX_LEN - 8) as t:  # long: the socket request comes while it runs
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(served.rec["socket"])
            s.sendall(json.dumps({"prompt_ids": [5, 6, 7, 8], "max_new_tokens": 6}).encode() + b"\n")
            with s.makefile("rb") as f:
                msgs = [json.loads(line) for line in f]
        assert t.is_alive(), "the HTTP stream ended first"
    done = msgs[-1]
    assert done.get("done") and done["batched"] == 2, done
    assert [m["token"] for m in msgs if "token" in m] == done["results"][0]["output_token_ids"]
    assert served.metrics()["llmstream_batch_size_max"] >= 2


def test_port_held_names_its_pool(served, smol_image):
    port = served.url.rsplit(":", 1)[1]
    proc = run_launch("serve", "--image", str(smol_image), "--name", "other", "--http", port, "--device", "cpu",
                      check=False, timeout=120)
    assert_user_error(proc, f"--http 127.0.0.1:{port}", repr(served.name), f"pid {served.rec['pid']}",
                      f"launch.py pool stop {served.name}")


def test_sigkill_leaves_nothing(served):
    name, srv_pid = served.name, served.rec["pid"]
    pool_pid = records.read_record(name)["pid"]
    served.proc.kill()
    served.proc.wait()
    t0 = time.monotonic()
    wait_until(lambda: not alive(srv_pid) and not alive(pool_pid), 30, "the server and the pool stop")
    print(f"server and pool gone {time.monotonic() - t0:.2f} s after the SIGKILL")
    assert port_closed(served.url), f"{served.url} still accepts connections"
    assert leftover_names(pool=name) == []
    left = [k for k in records.SUFFIXES if os.path.lexists(records.pool_file(name, k))]
    assert left == [], left
