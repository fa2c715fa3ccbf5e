"""A pool's server: one process that stays attached to a daemon pool with the model ready on its device and
generates for the runs that attach (``launch.py pool serve NAME``).

Why. A run that attaches to a pool itself (runtime/engine/source.py ``_attached_source``) reads nothing from disk,
but every such process pays its own start-up on the GPU before its first token: cudaHostRegister of the ring
it copies from (15 GB: 0.7-1.3 s on the H200 machine), its GPU tier's copy, and CUDA's libraries and kernels.
The server pays them once: it attaches as one of the pool's clients (the same code path), plans its GPU tier
from its own ``--gpu-mem-gb``, runs one pass to check itself, and then serves. A run that attaches while it
serves sends its prompt and gets its tokens back, and its first token costs the prefill.

Files in the pool dir (private, runtime/ipc/records.py): ``NAME.server`` (its record: JSON with pid, device,
limits, its engine configuration, plan, links and bound; written once it serves) and ``NAME.sock`` (a Unix
stream socket, mode 0600; a peer of another uid is refused, checked with SO_PEERCRED), log ``NAME.server.log``.

Protocol: JSON lines. The client sends one request, ``{"prompt_ids": [...], "max_new_tokens": N,
"temperature": T, "top_p": P, "seed": S, "stop_ids": [...]}`` (or ``"prompts": [[...], ...]`` with
``"batch_size": B`` for a batch, and ``"bench": true`` for a timed round), and reads ``{"token": id}`` per
token (``{"step": [ids]}`` per pass for a batch), then ``{"done": true, ...}`` with the result, or
``{"error": "..."}``. Requests are served in the order they arrive (the socket's backlog), so neither of two
clients can starve the other. Those that arrive while the server is busy wait for it; then, with ``pool serve
--batch-size B``, up to B of them that are greedy single prompts share their weight passes as one batch (each
gets exactly its solo tokens, stops on its own and gets its tokens as they come): two clients then cost about
one pass each step instead of two.

HTTP. With ``--http [HOST:]PORT`` the server also speaks OpenAI's API (runtime/services/http.py): uvicorn
listens (in a thread) from before the model loads (/health: 503), and once the model is ready a model thread
runs the continuous-batching scheduler (runtime/engine/scheduler.py) for the HTTP requests. The socket's
requests are served between two of the scheduler's steps (``ServerContext.model_lock``: one thread computes at
a time), as before. ``launch.py serve`` (``serve_foreground``) starts a pool and this server as a foreground
child, and stops both on Ctrl-C.

Faults. A client that goes away (SIGKILL) is noticed at the first token that cannot be sent: its request is
dropped and the next one served. A server that dies ends its clients' requests at once (their socket
closes): they fail with a message naming its pid and log. The server exits when its pool's coordinator is
gone (checked every 0.5 s while idle, and by the weight source while generating) and on SIGTERM (``pool
serve NAME --stop``, ``pool stop NAME``), removing its record and socket; after a SIGKILL, ``pool cleanup``,
``pool stop`` or the next ``pool serve`` removes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import ConfigError, UserError
from runtime.engine.config import EngineConfig, FlagConfig, SamplingConfig
from runtime.engine.drafts import open_draft_image
from runtime.engine.placement import Plan
from runtime.engine.source import open_source
from runtime.format.image import Image
from runtime.format.tokens import read_chat_template
from runtime.ipc.procs import SERVER_MODULE, kill_wait, pid_alive, spawn_detached, spawn_foreground
from runtime.ipc.records import (
    SERVER_RECORD_VERSION,
    clean_stale_server,
    coordinator_alive,
    list_servers,
    live_server,
    log_tail,
    pool_dir,
    pool_file,
    pool_lock,
    read_record,
    read_server_record,
    stop_server,
    write_private,
)
from runtime.ipc.shm import PoolHandle
from runtime.measure.bench import (
    BenchConfig,
    BenchContext,
    bound_report,
    build_report,
    memory_report,
    plan_line,
    run_round,
)
from runtime.measure.links import measure_disk_quick, measure_h2d
from runtime.pool.client import PoolDied
from runtime.services import pools
from runtime.services.http import HttpConfig, HttpServer, ServiceState, bind_listen, parse_listen

if TYPE_CHECKING:
    import torch

    from runtime.engine.scheduler import Scheduler
    from runtime.engine.weights import WeightSource

MAX_REQUEST = 64 << 20  # bytes of one request line
SEND_TIMEOUT_S = 30.0  # a client that stops reading for this long is dropped
# The flags a server fixes when it starts (EngineConfig flag names): a run through it must leave each at its
# default or give the server's own value.
SERVER_FLAGS = ("gpu_mem_gb", "gpu_cached_layers", "group_prefetch_depth", "kv_block_tokens", "kv_offload",
                "host_attention", "topk_blk", "prefill_chunk", "prefill_by_sequence", "draft", "draft_tokens")


@dataclass(frozen=True)
class ServeConfig(FlagConfig):
    """``pool serve``'s own flags (its engine's are EngineConfig: GPU budget, staging, KV, prefill)."""

    name: str
    stop: bool = False
    timeout: float = 10.0  # with --stop: seconds before SIGKILL
    device: str | None = None
    max_seq_len: int = 4096
    batch_size: int = 1
    h2d_gbps: float | None = None
    disk_gbps: float | None = None
    start_timeout: float = 600.0
    quiet: bool = False
    # OpenAI-compatible HTTP with continuous batching (runtime/services/http.py, runtime/engine/scheduler.py)
    http: str | None = None  # [HOST:]PORT
    api_key: str | None = None  # None: $LLMS_API_KEY, if set
    model_name: str | None = None  # None: the image's file name without .img
    max_batch: int = 8
    max_queue: int = 64
    batching: str = "continuous"
    request_timeout: float = 600.0
    send_timeout: float = 30.0
    no_prefix_cache: bool = False  # prompt reuse off (runtime/engine/prefix.py)
    chat_template: str | None = None  # a Jinja chat template file instead of the image's (runtime/format/tokens.py)
    owner_pid: int | None = None  # launch.py serve's pid: the server stops when it is gone (not a flag)

    @property
    def rows(self) -> int:
        """The scheduler's rows (sequences sharing a pass): --batch-size, or with --http the larger of it and
        --max-batch."""
        return max(self.batch_size, self.max_batch) if self.http is not None else self.batch_size

    def __post_init__(self) -> None:
        for key in ("max_seq_len", "batch_size", "max_batch", "max_queue"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, found {getattr(self, key)}")
        if self.http is not None:
            parse_listen(self.http)
        if self.batching not in ("continuous", "static"):
            raise ConfigError(f"--batching must be continuous or static, found {self.batching!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty: give a key, or leave the flag out")
        for key in ("h2d_gbps", "disk_gbps", "timeout", "start_timeout", "request_timeout", "send_timeout"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, found {v}")


@dataclass
class ServerContext:
    """What the server's request handling works with, once the model is ready."""

    name: str
    sched: Scheduler
    source: WeightSource
    plan: Plan | None
    handle: PoolHandle | None
    device: torch.device
    links: dict[str, Any]
    image: Image
    max_len: int
    batch: int
    rec: dict
    engine: EngineConfig
    stopping: dict


def server_for(attach: str | None, no_server: bool = False) -> dict | None:
    """The live server a run with ``--attach NAME`` goes through; None: the run attaches in-process
    (``--no-server``, no ``--attach``, or the pool has no server serving yet)."""
    if not attach or no_server:
        return None
    rec = live_server(attach)
    return rec if rec is not None and not rec.get("starting") else None


# ---- starting and stopping (launch.py pool serve) ------------------------------------------------------

def serve(cfg: ServeConfig, engine: EngineConfig) -> None:
    """``pool serve NAME``: start the server detached and wait until it serves (or ``--stop`` it)."""
    from runtime.engine.generate import pick_device  # torch: to know whether there is a GPU

    if cfg.stop:
        print(stop_server(cfg.name, cfg.timeout))
        return
    check_http(cfg, engine)
    pool = read_record(cfg.name)
    if not coordinator_alive(pool):
        raise UserError(f"pool {cfg.name!r} is not running (coordinator pid {pool.get('pid')} is gone); launch.py "
                        f"pool cleanup {cfg.name}, then pool start")
    if engine.speculative.draft not in (None, "ngram"):
        open_draft_image(engine.speculative.draft, Image.open(pool["image"]["path"], pool["image"]["manifest"]))
    device = str(pick_device(cfg.device))  # cuda when there is one; --device cuda without one refused
    name = cfg.name
    with pool_lock(name):
        rec = live_server(name)
        if rec is not None:
            raise UserError(f"pool {name!r} already has a server: pid {rec['pid']} on {rec['device']}"
                            f"{', starting' if rec.get('starting') else ''} (launch.py pool serve {name} --stop)")
        removed = clean_stale_server(name)
        if removed:
            print(f"pool {name}: removed a dead server's leftovers: {', '.join(removed)}", file=sys.stderr)
        spec = {"serve": dataclasses.asdict(dataclasses.replace(cfg, device=device)),
                "engine": dataclasses.replace(engine, attach=name, quiet=True).to_dict()}
        log = pool_file(name, "server_log")
        proc = spawn_detached(SERVER_MODULE, spec, pool_dir() / f"{name}.serve-start", log)
        # under the lock, before the server's own record (it takes the lock to write that)
        write_private(pool_file(name, "server"), {"version": SERVER_RECORD_VERSION, "name": name, "uid": os.getuid(),
                                                  "pid": proc.pid, "device": device, "log": str(log),
                                                  "starting": True})
    rec = _wait_serving(name, proc, log, cfg.start_timeout)
    if not cfg.quiet:
        print(f"pool {name}: server pid {rec['pid']} on {rec['device']}, up to {rec['max_seq_len']} tokens x "
              f"{rec['batch_size']} sequences; ready in {rec['ready_s']:.1f} s; log {log}", file=sys.stderr)
    print(f"pool {name} serves on {rec['device']}: launch.py run --attach {name} goes through it" +
          (f"; OpenAI-compatible HTTP on {rec['http']}/v1 ({rec['batching']} batching, up to {rec['max_batch']} "
           f"sequences)" if rec.get("http") else ""))


def check_http(cfg: ServeConfig, engine: EngineConfig) -> None:
    """What the server cannot serve, refused before anything starts (ConfigError naming the flag), and a port
    that cannot be listened on (held by an orphan of ours: its pool named)."""
    if engine.kv.topk_blk is not None or engine.kv.host_attention is not None:
        raise ConfigError("--topk-blk and --host-attention do not go with pool serve: its continuous batching "
                          "attends exactly, on the device (runs attached in-process take them: run --attach NAME "
                          "--no-server)")
    if cfg.chat_template is not None:  # readable, and jinja2 parses it
        read_chat_template(cfg.chat_template)
    if cfg.http is None:
        return
    host, port = parse_listen(cfg.http)
    try:
        bind_listen(host, port).close()  # an unknown host or a port in use: refused before anything starts
    except ConfigError as e:
        holder = next((r for r in list_servers() if port and (r.get("http") or "").endswith(f":{port}")), None)
        if holder is None:
            raise
        raise ConfigError(f"{e}: it is held by pool {holder['name']!r}'s server (pid {holder['pid']}), left running "
                          f"by an earlier launch.py serve or pool serve of yours; stop it with launch.py pool stop "
                          f"{holder['name']}") from None


def serve_foreground(start_cfg, cfg: ServeConfig, engine: EngineConfig) -> int:
    """``launch.py serve``: start pool ``start_cfg`` (a PoolStartConfig; runtime/services/pools.py), run its
    server with ``--http`` as a child in the foreground (its output on this terminal) until Ctrl-C or SIGTERM,
    then stop both. Both are given this process as their owner: when it is gone (SIGKILL) the pool's coordinator
    stops within its loop's tick and the server within 0.5 s, freeing the port. Returns the exit code (0 after a
    Ctrl-C)."""
    from runtime.engine.generate import pick_device  # torch: to know whether there is a GPU

    check_http(cfg, engine)
    device = str(pick_device(cfg.device))

    def on_term(signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # the pool and the server stop by themselves when this process is gone (SIGKILL leaves no orphans)
    cfg = dataclasses.replace(cfg, owner_pid=os.getpid())
    pools.start(dataclasses.replace(start_cfg, owner_pid=os.getpid()))
    name, proc = cfg.name, None
    try:
        spec = {"serve": dataclasses.asdict(dataclasses.replace(cfg, device=device)),
                "engine": dataclasses.replace(engine, attach=name, quiet=True).to_dict()}
        with pool_lock(name):
            clean_stale_server(name)
            proc = spawn_foreground(SERVER_MODULE, spec, pool_dir() / f"{name}.serve-start")
            write_private(pool_file(name, "server"), {"version": SERVER_RECORD_VERSION, "name": name,
                                                      "uid": os.getuid(), "pid": proc.pid, "device": device,
                                                      "log": "(this terminal)", "starting": True})
        try:
            rc = proc.wait()
            return rc if rc != -signal.SIGINT else 0
        except KeyboardInterrupt:  # Ctrl-C reached the server too (one process group); SIGTERM did not
            proc.send_signal(signal.SIGTERM)
            if proc.wait(cfg.timeout + 30) not in (0, -signal.SIGTERM):
                return 1
            return 0
    finally:
        if proc is not None and proc.poll() is None:
            kill_wait(proc.pid, 5.0)
            proc.wait()
        clean_stale_server(name)
        with contextlib.suppress(UserError):
            pools.stop(name, 10.0)


def _wait_serving(name: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            clean_stale_server(name)
            raise UserError(f"pool {name}: the server exited with code {proc.returncode} before serving; its log "
                            f"{log}:\n{log_tail(log)}")
        rec = read_server_record(name)
        if rec is not None and rec.get("pid") == proc.pid and not rec.get("starting"):
            return rec
        time.sleep(0.05)
    kill_wait(proc.pid, 5.0)
    proc.wait()
    clean_stale_server(name)
    raise UserError(f"pool {name}: the server did not serve within {timeout_s:.0f} s (--start-timeout); log {log}:\n"
                    f"{log_tail(log)}")


# ---- the client side (run / bench --attach) ---------------------------------------------------------------

def request(rec: dict, req: dict, on_message: Callable[[dict], None] | None = None,
            timeout_s: float = 600.0) -> dict:
    """Send ``req`` to the server of ``rec`` and read its answer: ``on_message`` gets each token or step
    message; returns the final ``done`` message. UserError if the server refuses the request, dies or
    does not answer within ``timeout_s`` (a request waits for those before it)."""
    name, pid = rec["name"], rec["pid"]
    log = rec.get("log", "")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        try:
            s.connect(rec["socket"])
        except OSError as e:
            raise UserError(f"pool {name!r}: its server (pid {pid}) does not answer on {rec['socket']} ({e}); "
                            f"launch.py pool serve {name} --stop, or run with --no-server") from None
        f = s.makefile("rwb")
        f.write(json.dumps(req).encode() + b"\n")
        f.flush()
        while True:
            try:
                line = f.readline()
            except TimeoutError:
                raise UserError(f"pool {name!r}: its server (pid {pid}) sent nothing for {timeout_s:.0f} s; "
                                f"log {log}") from None
            except OSError as e:
                line, why = b"", str(e)
            else:
                why = "connection closed"
            if not line:
                raise UserError(f"pool {name!r}: its server (pid {pid}) closed the connection before the answer "
                                f"was complete ({why}: it died or was stopped); log {log}")
            msg = json.loads(line)
            if "error" in msg:
                raise UserError(f"pool {name!r}, its server: {msg['error']}")
            if msg.get("done"):
                return msg
            if on_message is not None:
                on_message(msg)
    finally:
        s.close()



def check_run_config(cfg: EngineConfig, device: str | None, rec: dict) -> None:
    """Refuse a run through the server whose configuration it cannot honour (naming the flag): each of
    SERVER_FLAGS at its default or at the server's own value."""
    if device and not rec["device"].startswith(device):
        raise ConfigError(f"--device {device}: pool {rec['name']!r}'s server runs on {rec['device']} (leave out "
                          f"--device, or run with --no-server)")
    served, default = EngineConfig.from_dict(rec["engine"]), EngineConfig()
    for dest in SERVER_FLAGS:
        mine = cfg.get_flag(dest)
        if mine not in (default.get_flag(dest), served.get_flag(dest)):
            raise ConfigError(f"--{dest.replace('_', '-')} {mine}: pool {rec['name']!r}'s server fixed its own "
                              f"({served.get_flag(dest)}) when it started (launch.py pool serve); leave it out or run "
                              f"with --no-server")


# ---- the server process ------------------------------------------------------------------------------------

def server_main(cfg_file: str) -> int:
    spec = json.loads(Path(cfg_file).read_text())
    Path(cfg_file).unlink(missing_ok=True)
    return run_server(ServeConfig(**spec["serve"]), EngineConfig.from_dict(spec["engine"]))


def run_server(cfg: ServeConfig, engine: EngineConfig) -> int:
    """The server's life in this process (the detached one, or ``launch.py serve``'s child): serve until SIGTERM
    / SIGINT, its pool's end or its owner's (``launch.py serve``), then remove its record and socket."""
    name = cfg.name
    stopping = {"flag": False}

    def on_term(signum, _frame) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    print(f"[server {name} pid {os.getpid()}] starting on {cfg.device}", flush=True)
    sock = None
    try:
        sock = _serve(cfg, engine, stopping)
        return 0
    except (UserError, PoolDied) as e:
        print(f"[server {name}] error: {e}", flush=True)
        return 2
    finally:
        with contextlib.suppress(OSError):
            rec = read_server_record(name)
            if rec is not None and rec.get("pid") == os.getpid():
                pool_file(name, "server").unlink()
        if sock is not None or pool_file(name, "socket").is_socket():
            with contextlib.suppress(OSError):
                rec = read_server_record(name)
                if rec is None or rec.get("pid") == os.getpid():
                    pool_file(name, "socket").unlink()
        print(f"[server {name} pid {os.getpid()}] stopped", flush=True)


def _serve(cfg: ServeConfig, engine: EngineConfig, stopping: dict):
    import torch

    t_start = time.perf_counter()
    pool = read_record(cfg.name)
    image = Image.open(pool["image"]["path"], pool["image"]["manifest"])
    http = _start_http(cfg, image, cfg.max_seq_len) if cfg.http else None  # /health says 503 while the model loads
    try:
        device = torch.device(cfg.device)
        lk: dict[str, Any] = {"disk": {"gbps": cfg.disk_gbps, "source": "--disk-gbps"} if cfg.disk_gbps else None,
                              "h2d": None}
        if device.type == "cuda":  # measured before the plan takes the GPU budget
            lk["h2d"] = ({"gbps": cfg.h2d_gbps, "source": "--h2d-gbps"} if cfg.h2d_gbps else measure_h2d(device))
        return _serve_model(cfg, engine, stopping, image, device, lk, t_start, http)
    finally:
        if http is not None:
            http.stop()


def _start_http(cfg: ServeConfig, image: Image, max_len: int) -> HttpServer:
    from runtime.env import api_key_env

    host, port = parse_listen(cfg.http)
    key = cfg.api_key or api_key_env()
    model = cfg.model_name or image.path.name.removesuffix(".img")
    state = ServiceState(HttpConfig(model, max_len, key, cfg.request_timeout, cfg.send_timeout))
    http = HttpServer(state, bind_listen(host, port))
    http.start()
    print(f"[server {cfg.name}] HTTP on {http.url} (model {model!r}{', API key required' if key else ''}); "
          f"loading", flush=True)
    with pool_lock(cfg.name):  # the placeholder record gains the address (tests and --http 0 read it there)
        rec = read_server_record(cfg.name)
        if rec is not None and rec.get("pid") == os.getpid() and rec.get("starting"):
            write_private(pool_file(cfg.name, "server"), {**rec, "http": http.url})
    return http


def _serve_model(cfg: ServeConfig, engine: EngineConfig, stopping: dict, image: Image, device, lk: dict,
                 t_start: float, http: HttpServer | None):
    import torch

    from runtime.engine.scheduler import Scheduler, SchedulerConfig
    from runtime.engine.speculative import run_generator  # torch: the server computes
    from runtime.format.tokens import image_tokenizer, with_chat_template

    name = cfg.name
    max_len, rows = cfg.max_seq_len, cfg.rows
    room = engine.speculative.tree_room(device.type, engine.prefill.chunk)  # KV slots for a request's last tree
    with open_source(image, engine, device, batch=rows, max_len=max_len + room) as (source, plan, handle):
        if lk["disk"] is None and plan is not None and plan.disk_bytes_per_pass:  # the run streams from disk
            lk["disk"] = measure_disk_quick(str(image.path), image.image_size, 4)
        # the generator's own static decode off: no KV cache kept for its requests beside the scheduler's, whose
        # one-token passes replay graphs over its own (SchedulerConfig.graphs)
        gen = run_generator(source, engine.replace(cuda_graphs="off"), image, max_len + room)
        gen.generate([1], SamplingConfig(2 if room else 1))  # one pass: the whole path is warm before the first request
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sched = Scheduler(gen, SchedulerConfig(rows, cfg.max_queue, cfg.batching == "static",
                                               prefix_cache=not cfg.no_prefix_cache,
                                               graphs=engine.cuda_graphs == "on"), max_len)
        bound = bound_report(plan, lk, None)
        gpu, host = memory_report(device, source, handle)
        sock = _listen(pool_file(name, "socket"))
        rec = {"version": SERVER_RECORD_VERSION, "name": name, "uid": os.getuid(), "pid": os.getpid(),
               "socket": str(pool_file(name, "socket")), "log": str(pool_file(name, "server_log")),
               "device": str(device), "max_seq_len": max_len, "batch_size": rows,
               "http": http.url if http else None, "max_batch": rows, "batching": cfg.batching,
               "prefix_cache": not cfg.no_prefix_cache, "owner_pid": cfg.owner_pid,
               "gpu_mem_gb": engine.placement.gpu_mem_gb, "engine": engine.to_dict(),
               "started_unix": time.time(), "ready_s": time.perf_counter() - t_start,
               "plan": plan.to_dict() if plan else None, "links": lk, "bound": bound,
               "load_breakdown_ms": source.load_ms, "gpu_mem_GB": gpu, "host_mem_GB": host,
               "image": str(image.path)}
        ctx = ServerContext(name, sched, source, plan, handle, device, lk, image, max_len, rows, rec, engine,
                            stopping)
        halt = threading.Event()
        model = threading.Thread(target=_model_loop, args=(sched, halt, ctx), name="model", daemon=True)
        model.start()
        if http is not None:
            tok = image_tokenizer(image, required=False)
            http.state.attach(sched, with_chat_template(tok, cfg.chat_template) if cfg.chat_template else tok)
            print(f"[server {name}] HTTP ready on {http.url}: {cfg.batching} batching, up to {rows} sequences, "
                  f"queue {cfg.max_queue}", flush=True)
        handlers: list[threading.Thread] = []
        try:
            with pool_lock(name):  # after serve's placeholder; once HTTP is ready too
                write_private(pool_file(name, "server"), rec)
            print(f"[server {name}] serving on {device} after {rec['ready_s']:.1f} s: "
                  f"{plan.describe() if plan else ''}", flush=True)
            while not stopping["flag"]:
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    _check_alive(ctx, source, model, cfg.owner_pid)
                    continue
                t = threading.Thread(target=_connection, args=(conn, ctx), name="socket client", daemon=True)
                t.start()
                handlers = [h for h in handlers if h.is_alive()] + [t]
        finally:
            if http is not None:
                http.state.stopping = True
            halt.set()
            model.join(60.0)  # the step in flight ends; the requests left get an error
            deadline = time.monotonic() + 5.0
            for h in handlers:  # they send their clients the error, then close
                h.join(max(deadline - time.monotonic(), 0.0))
            sock.close()
    return sock


def _check_alive(ctx: ServerContext, source, model: threading.Thread, owner_pid: int | None) -> None:
    """Between two accepts: the pool, the model thread and the owner (``launch.py serve``) are still there."""
    source.client.check_alive()  # raises once the pool's coordinator is gone
    if not model.is_alive():
        raise PoolDied(f"pool {ctx.name!r}: the model thread ended (its log says why)") from None
    if owner_pid is not None and not pid_alive(owner_pid):
        print(f"[server {ctx.name}] its launch.py serve (pid {owner_pid}) is gone: stopping", flush=True)
        ctx.stopping["flag"] = True


def _model_loop(sched, halt: threading.Event, ctx: ServerContext) -> None:
    try:
        sched.run(halt)
    except BaseException:  # noqa: BLE001 (the pool died, or a bug): the main loop sees the thread end
        traceback.print_exc()
        ctx.stopping["flag"] = True


def _listen(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(64)
    s.settimeout(0.5)
    return s


class _Client:
    """One accepted connection of the Unix socket and its request; its scheduler events come through ``events``
    (the model thread must not block on a slow client) and are sent from the connection's own thread."""

    def __init__(self, conn: socket.socket, f, pid: int) -> None:
        self.conn, self.f, self.pid = conn, f, pid
        self.req: dict = {}
        self.events: queue.Queue = queue.Queue()

    def send(self, msg: dict) -> None:
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()

    def gone(self) -> bool:
        """The client closed its end (it sends nothing after its request: a readable socket is at its end)."""
        try:
            if not select.select([self.conn], [], [], 0)[0]:
                return False
            return self.conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            self.conn.close()


def _connection(conn: socket.socket, ctx: ServerContext) -> None:
    """A connection's thread: check the peer, read its request, serve it, close."""
    c = _open(conn, ctx)
    if c is None:
        return
    t0 = time.perf_counter()
    try:
        if ctx.stopping["flag"]:
            c.send({"error": "the server is stopping (pool serve --stop, or pool stop): request not run"})
            return
        try:
            parsed = _parse(c.req, ctx)
        except (UserError, ValueError, TypeError, KeyError) as e:  # refused alone, with the numbers
            print(f"[server {ctx.name}] request of pid {c.pid} refused: {e}", flush=True)
            c.send({"error": str(e)})
            return
        done = _bench(c, parsed, ctx) if c.req.get("bench") else _generate(c, parsed, ctx)
        if done is not None:
            c.send(done)
            print(f"[server {ctx.name}] pid {c.pid}: {done.get('summary', '')} in {time.perf_counter() - t0:.2f} s",
                  flush=True)
    except _Gone as e:
        print(f"[server {ctx.name}] pid {c.pid} went away ({e}); its request dropped", flush=True)
    except (OSError, TimeoutError) as e:
        print(f"[server {ctx.name}] pid {c.pid} went away ({type(e).__name__}); its request dropped", flush=True)
    finally:
        c.close()


def _open(conn: socket.socket, ctx: ServerContext) -> _Client | None:
    """Check the peer and read its request line; None (the connection closed) if refused or gone."""
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    conn.settimeout(SEND_TIMEOUT_S)
    c = _Client(conn, conn.makefile("rwb"), pid)
    try:
        if uid != os.getuid():
            c.send({"error": f"uid {uid} may not use the server of uid {os.getuid()}"})
            print(f"[server {ctx.name}] refused pid {pid} of uid {uid}", flush=True)
        else:
            line = c.f.readline(MAX_REQUEST)
            if line:  # else the client went away before asking
                try:
                    c.req = json.loads(line)
                    if not isinstance(c.req, dict):
                        raise ValueError("a request is one JSON object")
                    return c
                except ValueError as e:
                    c.send({"error": f"not a request: {e}"})
    except (OSError, TimeoutError):
        pass
    c.close()
    return None


class _Gone(Exception):
    """The client went away."""


def _wait_event(c: _Client, ctx: ServerContext) -> tuple[int, str, object]:
    """The next scheduler event of this connection's requests: (index, kind, payload). _Gone when the client
    went away meanwhile."""
    while True:
        try:
            return c.events.get(timeout=0.2)
        except queue.Empty:
            if c.gone():
                raise _Gone("connection closed") from None


def _submit(c: _Client, ctx: ServerContext, req) -> None:
    """Queue ``req`` in the scheduler; a full queue is waited out (a local run waits for its turn, as it always
    has; HTTP clients get 429 instead)."""
    from runtime.engine.scheduler import QueueFull

    while True:
        try:
            ctx.sched.submit(req)
            return
        except QueueFull:
            if c.gone():
                raise _Gone("connection closed while the queue was full") from None
            if ctx.stopping["flag"]:
                raise UserError("the server is stopping (pool serve --stop, or pool stop): request not run") from None
            time.sleep(0.05)


def _generate(c: _Client, p: Parsed, ctx: ServerContext) -> dict | None:
    """The request's prompts through the scheduler, at most its batch of them at a time (each its own sequence,
    sharing passes with every other request); one prompt's tokens are sent as they come. Returns the ``done``
    message, or None after an error was sent."""
    from runtime.engine.generate import GenerationResult
    from runtime.engine.scheduler import SeqRequest

    if p.sampling.max_new_tokens == 0:  # nothing to generate (as Generator.generate)
        return {"done": True, "results": [_result(GenerationResult(list(x), [])) for x in p.prompts], "batched": 1,
                "speculative": None, "summary": f"{len(p.prompts)} prompt(s), no tokens asked for"}
    reqs, results, running = [], [None] * len(p.prompts), 0
    single = len(p.prompts) == 1
    try:
        for i in range(len(p.prompts)):
            while running >= p.batch:
                running -= _relay(c, ctx, reqs, results, single)
            reqs.append(SeqRequest(p.prompts[i], p.sampling,
                                   lambda k, x, i=i: c.events.put((i, k, x)), p.stop_ids))
            _submit(c, ctx, reqs[-1])
            running += 1
        while running:
            running -= _relay(c, ctx, reqs, results, single)
    except _Failed as e:
        c.send({"error": str(e)})
        return None
    finally:
        for i, r in enumerate(reqs):
            if results[i] is None:
                ctx.sched.cancel(r)
    n = sum(len(r.output_token_ids) for r in results)
    spec = [r.speculative for r in results if r.speculative is not None]
    return {"done": True, "results": [_result(r) for r in results], "batched": max(r.batched for r in results),
            "speculative": spec[0] if single and spec else None,
            "summary": f"{len(p.prompts)} prompt(s), {sum(map(len, p.prompts))} prompt tokens "
                       f"({sum(r.cached_tokens for r in results)} reused), {n} generated, in batches of up to "
                       f"{max(r.batched for r in results)}"}


class _Failed(Exception):
    """A request's scheduler error."""


def _relay(c: _Client, ctx: ServerContext, reqs: list, results: list, single: bool) -> int:
    """Send on one event of the connection's requests; 1 when a request finished, else 0."""
    i, kind, x = _wait_event(c, ctx)
    if kind == "token":
        if single:
            c.send({"token": x.token})
        return 0
    if kind == "done":
        results[i] = x
        return 1
    if kind == "error":
        raise _Failed(x)
    return 0


def _bench(c: _Client, p: Parsed, ctx: ServerContext) -> dict | None:
    """A timed round as ``launch.py bench`` runs it, on the engine's own batch (``Generator.generate_batch``: its
    report means what an in-process bench's does), run in the model thread once the scheduler's batch is empty
    (``Scheduler.submit_job``); each pass's tokens are sent as they come."""
    def job(gen) -> None:
        if gen is None:
            c.events.put((0, "error", "the server is stopping (pool serve --stop, or pool stop): request not run"))
            return
        try:
            c.events.put((0, "done", _bench_round(gen, p, ctx, lambda toks: c.events.put((0, "step", toks)))))
        except PoolDied:
            c.events.put((0, "error", f"pool {ctx.name!r} died while serving this request"))
            raise
        except Exception as e:  # the request failed (out of memory, a bug): the next one is still served
            traceback.print_exc()
            c.events.put((0, "error", f"the request failed: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''} (server log {ctx.rec['log']})"))

    ctx.sched.submit_job(job)
    while True:
        _, kind, x = _wait_event(c, ctx)  # a client gone meanwhile: the round runs on, unsent
        if kind == "step":
            c.send({"step": x})
        elif kind == "done":
            return x
        else:
            c.send({"error": x})
            return None


def _bench_round(gen, p: Parsed, ctx: ServerContext, on_step) -> dict:
    import torch

    prompts, b, cfg = p.prompts, p.batch, p.sampling
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    r = run_round(gen, ctx.source, prompts[:b], cfg, on_step=on_step)
    bcfg = BenchConfig(batch_size=b, max_new_tokens=cfg.max_new_tokens, max_seq_len=ctx.max_len,
                       warmup_rounds=0, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    note = f"through pool {ctx.name!r}'s server (pid {os.getpid()}): the model was loaded when the server started"
    bctx = BenchContext(ctx.plan, ctx.links, prompts[:b], memory_report(ctx.device, ctx.source, ctx.handle),
                        ctx.device, ctx.image, ctx.source, gen.host_layers, notes=[note])
    return {"done": True, "report": build_report(bcfg, ctx.engine, bctx, r), "plan_line": plan_line(ctx.plan),
            "summary": f"bench round, batch {b}, {len(r.tokens)} passes"}


@dataclass(frozen=True)
class Parsed:
    """A socket request's prompts, batch, sampling and stop tokens, checked against the server's limits."""

    prompts: list[list[int]]
    batch: int
    sampling: SamplingConfig
    stop_ids: frozenset[int]


def _parse(req: dict, ctx: ServerContext) -> Parsed:
    """ConfigError naming the numbers for what the server cannot serve."""
    vocab = ctx.image.args.vocab_size
    prompts = req.get("prompts") or [req.get("prompt_ids")]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise ConfigError("the request has no prompt (prompt_ids or prompts: lists of token ids)")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt {i + 1}: token id {bad[0]!r} is outside the vocabulary (0..{vocab - 1})")
    b = int(req.get("batch_size") or 1)
    if not 1 <= b <= ctx.batch:
        raise ConfigError(f"--batch-size {b}: the server holds a KV cache for {ctx.batch} sequences (pool "
                          f"serve --batch-size / --max-batch)")
    new = int(req.get("max_new_tokens", 32))
    longest = max(len(p) for p in prompts)
    if longest + new > ctx.max_len:
        raise ConfigError(f"prompt ({longest} tokens) + --max-new-tokens ({new}) exceeds the server's "
                          f"--max-seq-len {ctx.max_len} (pool serve --max-seq-len)")
    sampling = SamplingConfig(new, float(req.get("temperature", 0.0)), float(req.get("top_p", 1.0)),
                              int(req.get("seed", 0)))
    return Parsed(prompts, b, sampling, frozenset(int(t) for t in req.get("stop_ids", [])))


def _result(r) -> dict:
    """A GenerationResult as JSON (the client rebuilds it with GenerationResult(**d))."""
    return dataclasses.asdict(r)


if __name__ == "__main__":
    sys.exit(server_main(sys.argv[1]))
