"""Benchmark django_redis_ex against raw redis-py and Django's own RedisCache.

Run from the repository root::

    python benchmarks/bench.py            # default run, a few minutes
    python benchmarks/bench.py --quick    # under a minute
    python benchmarks/bench.py --quick --scale 0.05 --json out.json   # smoke test

One run, one Redis: the raw sync and asyncio clients of redis-py (the limit), both classes of
django_redis_ex on their sync and async paths, Django's RedisCache, and any ``--backend``.
Each measurement does a fixed amount of work; backends are interleaved in every repetition and
each figure is also given as a ratio to the raw client of the same kind, paired by repetition.

Without ``--location`` a throwaway ``redis-server`` is started on a free loopback port and
stopped at the end. redis-server and this process share one CPU, the helper that samples the
server's connected clients runs on the other (``--no-pin`` turns pinning off): on a 2-core
machine a GET loop is several times faster on a shared CPU, and unpinned figures flip between
the two.

The raw clients use redis-py's defaults (no socket timeout): they are the limit. Every wait is
bounded all the same: asyncio work by ``wait_for``, threads by ``join`` timeouts, and the whole
run by ``--max-seconds``, past which the server is stopped and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import contextvars
import functools
import gc
import hashlib
import importlib
import json
import os
import pickle
import platform
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import django
import redis
import redis.asyncio
from django.conf import settings
from django.core.cache import caches
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.utils.module_loading import import_string

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # django_redis_ex need not be installed

RAW = "redis-py"
EX = "django_redis_ex.RedisEXCache"
AEX = "django_redis_ex.AsyncRedisEXCache"
DJANGO = "django.core.cache.backends.redis.RedisCache"
LABELS = {RAW: "raw redis-py", EX: "RedisEXCache", AEX: "AsyncRedisEXCache", DJANGO: "Django"}

VALUE = b"v" * 100  # the cached value: 100 bytes
PAYLOAD = pickle.dumps(VALUE, pickle.HIGHEST_PROTOCOL)  # what the backends store for it
TIMEOUT = 300  # Django's default TIMEOUT: every SET carries EX 300
MANY_KEYS = [f"many:{i}" for i in range(100)]
MANY_DATA = dict.fromkeys(MANY_KEYS, VALUE)
THREADS = 8
TASKS = 100
URLCONF = "bench_urls"
SAMPLE_INTERVAL = 0.003  # seconds between two INFO clients of the sampler
STEP_TIMEOUT = 300.0  # seconds one measurement may take before it is abandoned
CHUNK = 10  # operations between two looks at the clock
QUICK = 0.15  # share of the default work that --quick does


# ---------------------------------------------------------------------------
# Scenarios and backends
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "sync", "async" or "asgi": which raw client is the reference
    title: str
    unit: str
    base: int  # work of one measurement in a default run


SCENARIOS = [
    Scenario("sync.get_hit", "sync", "get (hit)", "ops", 4_000),
    Scenario("sync.get_miss", "sync", "get (miss)", "ops", 4_000),
    Scenario("sync.set", "sync", "set 100 B", "ops", 4_000),
    Scenario("sync.get_many", "sync", "get_many 100", "calls", 500),
    Scenario("sync.set_many", "sync", "set_many 100", "calls", 300),
    Scenario("sync.incr", "sync", "incr", "ops", 4_000),
    Scenario("threads.get", "sync", f"get, {THREADS} threads", "ops", 4_000),
    Scenario("async.get", "async", f"aget, {TASKS} tasks", "ops", 4_000),
    Scenario("async.set", "async", f"aset, {TASKS} tasks", "ops", 4_000),
    Scenario("async.get_many", "async", f"aget_many 100, {TASKS} tasks", "calls", 300),
    Scenario("async.set_many", "async", f"aset_many 100, {TASKS} tasks", "calls", 150),
    Scenario("asgi.async_view", "asgi", "ASGI async view", "requests", 2_000),
    Scenario("asgi.sync_view", "asgi", "ASGI sync view", "requests", 2_000),
]


@dataclass(frozen=True)
class Backend:
    key: str  # dotted path of the cache class, or RAW
    alias: str | None  # cache alias in CACHES; None for the raw clients

    @property
    def label(self) -> str:
        parts = self.key.split(".")
        return LABELS.get(self.key, f"{parts[0]}.{parts[-1]}" if len(parts) > 2 else self.key)


@dataclass
class Run:
    """Everything one benchmark run shares: server, raw clients, options, results."""

    url: str
    prefix: str  # every key of this run starts with it
    args: argparse.Namespace
    backends: list[Backend]
    raw_sync: redis.Redis
    monitor: redis.Redis  # INFO only, opened before any measurement
    reps: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    def raw_key(self, name: str) -> str:
        return f"{self.prefix}raw:1:{name}"

    def error(self, backend: Backend, where: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        self.errors.setdefault(backend.key, {})[where] = message
        print(f"  ! {backend.label} {where}: {message}", file=sys.stderr, flush=True)


class RawAsync:
    """The raw asyncio client of the running loop, for the ASGI views."""

    client: redis.asyncio.Redis | None = None


_run: Run | None = None  # for the views


def work(scenario: Scenario, args: argparse.Namespace) -> int:
    """Operations (calls, requests) of one measurement: --requests is taken as given."""
    if scenario.kind == "asgi" and args.requests_given:
        return int(args.requests)
    base = args.requests if scenario.kind == "asgi" else scenario.base
    return max(1, round(base * args.scale * (QUICK if args.quick else 1.0)))


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` workers, none empty."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


# ---------------------------------------------------------------------------
# Redis server, helper processes, cleanup
# ---------------------------------------------------------------------------


class Processes:
    """Child processes this run started, stopped by PID at exit whatever happens."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[Any]] = []
        self.dirs: list[str] = []
        atexit.register(self.stop_all)

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, **kwargs)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        while self.children:
            self.stop(self.children.pop())
        while self.dirs:
            shutil.rmtree(self.dirs.pop(), ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(procs: Processes) -> str:
    """A throwaway redis-server on a free loopback port; its URL once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on the PATH: apt-get install redis-server, or --location")
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    procs.dirs.append(workdir)
    for _attempt in range(3):
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", workdir, "--daemonize", "no"]
        proc = procs.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        probe = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=1)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                probe.ping()
                probe.close()
                return url
            time.sleep(0.05)
        probe.close()
        procs.stop(proc)
    sys.exit("could not start redis-server on a free port")


_SAMPLER = """
import os, select, sys, time
import redis
url, cpu, interval, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
client = redis.Redis.from_url(url, socket_timeout=5)
def clients():
    return int(client.info("clients")["connected_clients"])
peak = samples = 0
active = False  # sample only inside a window: idle, it costs the server nothing
print("ready", flush=True)
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    wait = interval if active else max(0.0, deadline - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0]:
        command = sys.stdin.readline().strip()
        if command == "start":
            active, peak, samples = True, clients(), 1
            print(peak, flush=True)
        elif command == "stop":
            active = False
            print(max(peak, clients()), samples + 1, flush=True)
        else:
            break
    elif active:
        peak, samples = max(peak, clients()), samples + 1
"""


class Sampler:
    """A helper process on the other CPU that polls INFO clients to catch the peak."""

    def __init__(self, procs: Processes, url: str, cpu: int | None) -> None:
        argv = [sys.executable, "-c", _SAMPLER, url, str(-1 if cpu is None else cpu)]
        argv += [str(SAMPLE_INTERVAL), "3600"]
        self.proc = procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> list[str]:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 30)[0]:
            raise TimeoutError("the connected-clients sampler does not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the connected-clients sampler exited")
        return line.split()

    def _ask(self, command: str) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self) -> int:
        """Start a window; the connected clients now."""
        return int(self._ask("start")[0])

    def stop(self) -> tuple[int, int]:
        """End the window: its peak of connected clients and how many samples it took."""
        peak, samples = self._ask("stop")
        return int(peak), int(samples)


def cleanup_keys(client: redis.Redis, prefix: str) -> int:
    """Delete this run's keys (SCAN MATCH + DEL; never FLUSHDB); how many were deleted."""
    deleted = 0
    cursor = 0
    for _ in range(100_000):
        cursor, keys = client.scan(cursor=cursor, match=f"{prefix}*", count=1000)
        if keys:
            deleted += client.delete(*keys)
        if cursor == 0:
            break
    return deleted


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{parts.hostname}:{parts.port}"))


# ---------------------------------------------------------------------------
# Django: settings, urls and views
# ---------------------------------------------------------------------------


def configure_django(url: str, prefix: str, extra: list[str]) -> tuple[list[Backend], list[str]]:
    """settings.configure() with one alias per backend; the backends and failed imports."""
    backends = [Backend(RAW, None)]
    failed = []
    caches_setting: dict[str, dict[str, Any]] = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    }
    # Django's RedisCache waits forever on a frozen server; the timeout bounds that, and only.
    options = {DJANGO: {"socket_timeout": 10, "socket_connect_timeout": 5}}
    for i, dotted in enumerate([EX, AEX, DJANGO, *extra]):
        try:
            import_string(dotted)
        except Exception:  # reported by main(); the run goes on without it
            failed.append(dotted)
            continue
        alias = f"b{i}"
        caches_setting[alias] = {
            "BACKEND": dotted,
            "LOCATION": url,
            "KEY_PREFIX": f"{prefix}{alias}",
            "TIMEOUT": TIMEOUT,
            "OPTIONS": options.get(dotted, {}),
        }
        backends.append(Backend(dotted, alias))
    urls = types.ModuleType(URLCONF)
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("async/<str:alias>/", async_view),
        path("sync/<str:alias>/", sync_view),
    ]
    sys.modules[URLCONF] = urls
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-" + secrets.token_hex(16),
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=URLCONF,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        CACHES=caches_setting,
        USE_TZ=True,
    )
    django.setup()
    return backends, failed


async def async_view(request: HttpRequest, alias: str) -> HttpResponse:
    """aset + aget through caches[alias] (or the raw asyncio client)."""
    if alias == "raw":
        assert _run is not None and RawAsync.client is not None
        key = _run.raw_key("asgi:async")
        await RawAsync.client.set(key, PAYLOAD, ex=TIMEOUT)
        ok = await RawAsync.client.get(key) == PAYLOAD
    else:
        cache = caches[alias]
        await cache.aset("asgi:async", VALUE)
        ok = await cache.aget("asgi:async") == VALUE
    return HttpResponse(b"ok", status=200 if ok else 500)


def sync_view(request: HttpRequest, alias: str) -> HttpResponse:
    """set + get through caches[alias] (or the raw sync client)."""
    if alias == "raw":
        assert _run is not None
        key = _run.raw_key("asgi:sync")
        _run.raw_sync.set(key, PAYLOAD, ex=TIMEOUT)
        ok = _run.raw_sync.get(key) == PAYLOAD
    else:
        cache = caches[alias]
        cache.set("asgi:sync", VALUE)
        ok = cache.get("asgi:sync") == VALUE
    return HttpResponse(b"ok", status=200 if ok else 500)


# ---------------------------------------------------------------------------
# Operations: one unit of work of a scenario, for a cache or a raw client
# ---------------------------------------------------------------------------


def seed(run: Run, backend: Backend) -> None:
    """The keys the scenarios read, written through the backend itself (sync path)."""
    if backend.alias is None:
        pipe = run.raw_sync.pipeline(transaction=False)
        pipe.set(run.raw_key("hit"), PAYLOAD)
        pipe.set(run.raw_key("counter"), 0)
        pipe.mset({run.raw_key(k): PAYLOAD for k in MANY_KEYS})
        pipe.execute()
        return
    cache = caches[backend.alias]
    cache.set("hit", VALUE, None)
    cache.set("counter", 0, None)
    cache.set_many(MANY_DATA, None)


def sync_op(run: Run, backend: Backend, scenario: str) -> Callable[[], Any]:
    """One sync operation of ``scenario``; resolves ``caches[alias]`` in the calling thread."""
    op = scenario.split(".")[1]
    op = "get_hit" if op == "get" else op
    if backend.alias is not None:
        cache = caches[backend.alias]
        return {
            "get_hit": functools.partial(cache.get, "hit"),
            "get_miss": functools.partial(cache.get, "miss"),
            "set": functools.partial(cache.set, "set", VALUE),
            "get_many": functools.partial(cache.get_many, MANY_KEYS),
            "set_many": functools.partial(cache.set_many, MANY_DATA),
            "incr": functools.partial(cache.incr, "counter"),
        }[op]
    client, key = run.raw_sync, run.raw_key
    many = [key(k) for k in MANY_KEYS]

    def set_many() -> Any:
        pipe = client.pipeline(transaction=False)
        for name in many:
            pipe.set(name, PAYLOAD, ex=TIMEOUT)
        return pipe.execute()

    ops: dict[str, Callable[[], Any]] = {
        "get_hit": functools.partial(client.get, key("hit")),
        "get_miss": functools.partial(client.get, key("miss")),
        "set": functools.partial(client.set, key("set"), PAYLOAD, ex=TIMEOUT),
        "get_many": functools.partial(client.mget, many),
        "set_many": set_many,
        "incr": functools.partial(client.incr, key("counter")),
    }
    return ops[op]


def async_op(run: Run, backend: Backend, scenario: str) -> Callable[[], Awaitable[Any]]:
    """One async operation of ``scenario``, for the running loop."""
    op = scenario.split(".")[1]
    if backend.alias is not None:
        cache = caches[backend.alias]
        return {
            "get": functools.partial(cache.aget, "hit"),
            "set": functools.partial(cache.aset, "aset", VALUE),
            "get_many": functools.partial(cache.aget_many, MANY_KEYS),
            "set_many": functools.partial(cache.aset_many, MANY_DATA),
        }[op]
    assert RawAsync.client is not None
    client, key = RawAsync.client, run.raw_key
    many = [key(k) for k in MANY_KEYS]

    async def set_many() -> Any:
        pipe = client.pipeline(transaction=False)
        for name in many:
            pipe.set(name, PAYLOAD, ex=TIMEOUT)
        return await pipe.execute()

    aops: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": functools.partial(client.get, key("hit")),
        "set": functools.partial(client.set, key("aset"), PAYLOAD, ex=TIMEOUT),
        "get_many": functools.partial(client.mget, many),
        "set_many": set_many,
    }
    return aops[op]


@contextlib.asynccontextmanager
async def raw_async_client(run: Run) -> Any:
    """The raw asyncio client with redis-py's defaults, built once for this loop on its own
    pool (the waits around it are bounded by STEP_TIMEOUT)."""
    RawAsync.client = redis.asyncio.Redis.from_url(run.url)
    try:
        yield RawAsync.client
    finally:
        await RawAsync.client.aclose()
        RawAsync.client = None


# ---------------------------------------------------------------------------
# Measurements: each returns ops (or requests) per second, plus extras
# ---------------------------------------------------------------------------


def rate(done: int, n: int, elapsed: float) -> dict[str, Any]:
    """One repetition's figures; ``capped`` when the time cap cut the work short."""
    return {"ops_per_s": done / elapsed, "ops": done, "seconds": elapsed, "capped": done < n}


def run_ops(op: Callable[[], Any], n: int, deadline: float) -> int:
    """``op()`` ``n`` times, or fewer if ``deadline`` (perf_counter) passes; how many ran."""
    done = 0
    while done < n:
        chunk = min(CHUNK, n - done)
        for _ in range(chunk):
            op()
        done += chunk
        if time.perf_counter() > deadline:
            break
    return done


def measure_sync(run: Run, backend: Backend, scenario: Scenario, n: int) -> dict[str, Any]:
    op = sync_op(run, backend, scenario.name)
    for _ in range(min(n, 20)):
        op()
    gc.collect()
    start = time.perf_counter()
    done = run_ops(op, n, start + run.args.cap)
    return rate(done, n, time.perf_counter() - start)


def measure_threads(run: Run, backend: Backend, scenario: Scenario, n: int) -> dict[str, Any]:
    counts = split(n, THREADS)
    barrier = threading.Barrier(len(counts) + 1)
    failures: list[BaseException] = []
    done = [0] * len(counts)
    deadline = [0.0]

    def worker(index: int) -> None:
        try:
            op = sync_op(run, backend, scenario.name)  # this thread's cache object, as Django's
            for _ in range(min(counts[index], 20)):
                op()
            barrier.wait(timeout=STEP_TIMEOUT)
            done[index] = run_ops(op, counts[index], deadline[0])
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(counts))]
    for thread in threads:
        thread.start()
    gc.collect()
    with contextlib.suppress(threading.BrokenBarrierError):
        deadline[0] = time.perf_counter() + run.args.cap + 0.1
        barrier.wait(timeout=STEP_TIMEOUT)
    start = time.perf_counter()
    join_by = time.monotonic() + STEP_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, join_by - time.monotonic()))
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"threads still running after {STEP_TIMEOUT} s")
    return rate(sum(done), n, elapsed)


async def _measure_async(run: Run, backend: Backend, scenario: Scenario, n: int) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        if backend.alias is None:
            await stack.enter_async_context(raw_async_client(run))
        op = async_op(run, backend, scenario.name)
        warm = async_op(run, backend, "async.get")
        left = 0
        deadline = 0.0

        async def worker() -> None:
            nonlocal left
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                await op()

        async def burst(total: int, seconds: float) -> int:
            nonlocal left, deadline
            left, deadline = total, time.perf_counter() + seconds
            workers = (worker() for _ in range(min(TASKS, total)))
            await asyncio.wait_for(asyncio.gather(*workers), STEP_TIMEOUT)
            return total - left

        # Warm-up: one cheap read per task opens the pool's connections (and Django's
        # executor thread), then a few of the measured operation.
        await asyncio.wait_for(asyncio.gather(*(warm() for _ in range(TASKS))), STEP_TIMEOUT)
        await burst(min(n, 5), run.args.cap / 4)
        gc.collect()
        start = time.perf_counter()
        done = await burst(n, run.args.cap)
        return rate(done, n, time.perf_counter() - start)


def measure_async(run: Run, backend: Backend, scenario: Scenario, n: int) -> dict[str, Any]:
    return asyncio.run(_measure_async(run, backend, scenario, n))


async def asgi_requests(app: ASGIHandler, url_path: str, n: int, concurrency: int) -> int:
    """Serve ``n`` GET requests of ``url_path`` through the ASGI app; how many were not 200."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": url_path,
        "raw_path": url_path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    failed = 0
    remaining = iter(range(n))

    async def one() -> None:
        nonlocal failed
        finished = asyncio.Event()
        status: list[int] = []
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()  # as a server: the client leaves once answered
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()

        await app(dict(scope), receive, send)
        finished.set()
        if status != [200]:
            failed += 1

    async def worker() -> None:
        for _ in remaining:
            await one()

    workers = [worker() for _ in range(min(concurrency, n))]
    await asyncio.wait_for(asyncio.gather(*workers), STEP_TIMEOUT)
    return failed


def reset_sync_pool(run: Run, backend: Backend) -> None:
    """Close the process-wide sync connections a backend keeps, so each run starts cold."""
    if backend.alias is None:
        run.raw_sync.connection_pool.disconnect()
        return
    cache = caches[backend.alias]
    get_client = getattr(cache, "get_client", None) or getattr(
        getattr(cache, "client", None), "get_client", None
    )
    if get_client is not None and backend.key != DJANGO:  # Django's pools die with the object
        with contextlib.suppress(Exception):
            get_client(write=True).connection_pool.disconnect()


def measure_asgi(
    run: Run, backend: Backend, scenario: Scenario, n: int, app: ASGIHandler, sampler: Sampler
) -> dict[str, Any]:
    view = scenario.name.split(".")[1].removesuffix("_view")
    url_path = f"/{view}/{backend.alias or 'raw'}/"
    warmup = max(1, min(n // 10, run.args.concurrency))

    async def serve() -> tuple[float, int]:
        async with contextlib.AsyncExitStack() as stack:
            if backend.alias is None:
                await stack.enter_async_context(raw_async_client(run))
            await asgi_requests(app, url_path, warmup, run.args.concurrency)
            gc.collect()
            start = time.perf_counter()
            failed = await asgi_requests(app, url_path, n, run.args.concurrency)
            return n / (time.perf_counter() - start), failed

    reset_sync_pool(run, backend)
    gc.collect()
    received_before = run.monitor.info("stats")["total_connections_received"]
    baseline = sampler.start()
    try:
        # A fresh context, as a server's: request tasks must not inherit cache objects that
        # this process created outside requests (asgiref's Local is context-local).
        rps, failed = contextvars.Context().run(asyncio.run, serve())
    finally:
        peak, samples = sampler.stop()
    received = run.monitor.info("stats")["total_connections_received"] - received_before
    return {
        "ops_per_s": rps,
        "failed_requests": failed,
        "connections_received": received,
        "peak_clients": peak - baseline,
        "peak_clients_total": peak,
        "baseline_clients": baseline,
        "samples": samples,
    }


# ---------------------------------------------------------------------------
# Driving the run
# ---------------------------------------------------------------------------


def run_scenario(run: Run, scenario: Scenario, app: ASGIHandler, sampler: Sampler | None) -> None:
    args = run.args
    n = work(scenario, args)
    backends = run.backends
    failed: set[str] = set()
    started = time.monotonic()
    reps = args.asgi_reps if scenario.kind == "asgi" else args.reps
    print(
        f"[{scenario.name}] {scenario.title}: {n} {scenario.unit} x {reps} reps x "
        f"{len(backends)} backends",
        file=sys.stderr,
        flush=True,
    )
    per_backend = run.reps.setdefault(scenario.name, {})
    for rep in range(reps):
        shift = rep % len(backends)
        for backend in backends[shift:] + backends[:shift]:  # interleaved, rotated
            if backend.key in failed:
                continue
            try:
                seed(run, backend)
                if scenario.kind == "asgi":
                    assert sampler is not None
                    result = measure_asgi(run, backend, scenario, n, app, sampler)
                elif scenario.name.startswith("threads."):
                    result = measure_threads(run, backend, scenario, n)
                elif scenario.kind == "async":
                    result = measure_async(run, backend, scenario, n)
                else:
                    result = measure_sync(run, backend, scenario, n)
            except Exception as exc:
                run.error(backend, scenario.name, exc)
                failed.add(backend.key)
                per_backend.pop(backend.key, None)
                continue
            result["rep"] = rep
            per_backend.setdefault(backend.key, []).append(result)
    summary = summarize_scenario(run, scenario.name)
    cells = "  ".join(
        f"{LABELS.get(k, k)} {v['ops_per_s']:,.0f}/s {v['ratio']:.2f}x"
        for k, v in summary.items()
        if v.get("ratio") is not None
    )
    print(
        f"[{scenario.name}] done in {time.monotonic() - started:.1f} s: {cells}",
        file=sys.stderr,
        flush=True,
    )


def paired_ratio(run: Run, scenario: str, backend: str, reference: str) -> list[float]:
    """``backend`` / ``reference`` ops/s for each repetition both completed."""
    reps = run.reps.get(scenario, {})
    mine = {r["rep"]: r["ops_per_s"] for r in reps.get(backend, [])}
    theirs = {r["rep"]: r["ops_per_s"] for r in reps.get(reference, [])}
    return [mine[i] / theirs[i] for i in sorted(mine) if i in theirs and theirs[i] > 0]


def summarize_scenario(run: Run, scenario: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for backend, reps in run.reps.get(scenario, {}).items():
        ratios = paired_ratio(run, scenario, backend, RAW)
        entry: dict[str, Any] = {
            "ops_per_s": statistics.median(r["ops_per_s"] for r in reps),
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_reps": ratios,
            "reps": reps,
        }
        if scenario.startswith("asgi."):
            entry["connections_received"] = max(r["connections_received"] for r in reps)
            entry["peak_clients"] = max(r["peak_clients"] for r in reps)
            entry["failed_requests"] = sum(r["failed_requests"] for r in reps)
        out[backend] = entry
    return out


# ---------------------------------------------------------------------------
# Targets and report
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scenario: str
    backend: str
    reference: str | None  # a backend key for a ratio; None: connections received
    limit: float

    def measure(self, run: Run) -> float | None:
        if self.reference is None:
            reps = run.reps.get(self.scenario, {}).get(self.backend)
            return float(max(r["connections_received"] for r in reps)) if reps else None
        ratios = paired_ratio(run, self.scenario, self.backend, self.reference)
        return statistics.median(ratios) if ratios else None

    def passed(self, value: float) -> bool:
        return value <= self.limit if self.reference is None else value >= self.limit

    def describe(self) -> str:
        who = f"{self.scenario} {LABELS[self.backend]}"
        if self.reference is None:
            return f"{who}: connections received <= {self.limit:g}"
        reference = {RAW: "raw", EX: "RedisEXCache", AEX: "AsyncRedisEXCache"}.get(
            self.reference, "Django"
        )
        return f"{who} / {reference} >= {self.limit:g}"


def targets() -> list[Target]:
    out = []
    both = (EX, AEX)
    for s in ("sync.get_hit", "sync.get_miss", "threads.get", "sync.set", "sync.incr"):
        out += [Target(s, c, RAW, 0.90) for c in both]
    for s in ("async.get", "async.set"):
        out += [Target(s, c, RAW, 0.90) for c in both]
        out += [Target(s, c, DJANGO, 2.0) for c in both]
    for s in ("sync.get_many", "sync.set_many", "async.get_many", "async.set_many"):
        out += [Target(s, c, RAW, 0.60) for c in both]
    # The non-native path of each class against the other class's native path.
    for scenario in SCENARIOS:
        if scenario.kind == "sync":
            out.append(Target(scenario.name, AEX, EX, 0.90))
        elif scenario.kind == "async":
            out.append(Target(scenario.name, EX, AEX, 0.90))
    out += [Target("sync.incr", c, DJANGO, 1.6) for c in both]
    for s in ("asgi.async_view", "asgi.sync_view"):
        out += [Target(s, c, None, 60) for c in both]
        out += [Target(s, c, DJANGO, 1.0) for c in both]
    return out


def table(run: Run, results: dict[str, dict[str, dict[str, Any]]]) -> str:
    keys = [b.key for b in run.backends]
    labels = [b.label for b in run.backends]
    width = max(20, *(len(label) + 2 for label in labels))
    lines = [
        "ops/s (median) and ratio to the raw client of the same kind (median of per-rep ratios)",
        f"{'scenario':<16}{'work':<24}" + "".join(f"{label:>{width}}" for label in labels),
    ]
    for scenario in SCENARIOS:
        if scenario.name not in results:
            continue
        cells = []
        for key in keys:
            entry = results[scenario.name].get(key)
            if entry is None:
                cells.append(f"{'error' if key in run.errors else '-':>{width}}")
                continue
            ratio = entry["ratio"]
            text = f"{entry['ops_per_s']:,.0f} {'' if ratio is None else f'{ratio:.2f}x'}"
            cells.append(f"{text:>{width}}")
        lines.append(f"{scenario.name:<16}{scenario.title:<24}" + "".join(cells))
    asgi = [s for s in SCENARIOS if s.kind == "asgi" and s.name in results]
    if asgi:
        lines += ["", "ASGI: connections received (max over reps), peak connected clients above "]
        lines[-1] += "the baseline (max), non-200 responses"
        lines.append(f"{'scenario':<16}{'backend':<{width}}{'req/s':>10}{'ratio':>8}")
        lines[-1] += f"{'conns':>8}{'peak':>8}{'failed':>8}"
        for scenario in asgi:
            for backend in run.backends:
                entry = results[scenario.name].get(backend.key)
                if entry is None:
                    continue
                ratio = "" if entry["ratio"] is None else f"{entry['ratio']:.2f}"
                lines.append(
                    f"{scenario.name:<16}{backend.label:<{width}}{entry['ops_per_s']:>10,.0f}"
                    f"{ratio:>8}{entry['connections_received']:>8}{entry['peak_clients']:>8}"
                    f"{entry['failed_requests']:>8}"
                )
    return "\n".join(lines)


def target_report(run: Run) -> tuple[str, list[dict[str, Any]]]:
    lines = ["", "targets (ratios of this run, median of per-rep ratios)"]
    rows = []
    for target in targets():
        value = target.measure(run)
        status = "n/a" if value is None else ("PASS" if target.passed(value) else "MISS")
        shown = (
            "-"
            if value is None
            else (f"{value:.0f}" if target.reference is None else f"{value:.2f}")
        )
        lines.append(f"  {status:<5}{shown:>7}  {target.describe()}")
        rows.append({"target": target.describe(), "value": value, "status": status})
    misses = sum(row["status"] == "MISS" for row in rows)
    passes = sum(row["status"] == "PASS" for row in rows)
    lines.append(f"  {passes} passed, {misses} missed, {len(rows) - passes - misses} not measured")
    return "\n".join(lines), rows


def source_id(module: types.ModuleType) -> dict[str, Any]:
    """Which django_redis_ex was measured: file, SHA-256, git commit and whether it is edited."""
    file = Path(str(module.__file__))
    out: dict[str, Any] = {
        "file": str(file),
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
    }
    git = ["git", "-C", str(file.parent)]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, timeout=5)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", file.name], capture_output=True, timeout=5
        )
        if commit.returncode == 0:
            out["commit"] = commit.stdout.decode().strip()
            out["modified"] = bool(status.stdout.strip())
    return out


def meta(run: Run, started: float, cpus: tuple[int, int | None] | None) -> dict[str, Any]:
    ex = importlib.import_module("django_redis_ex")
    server = run.monitor.info("server")
    return {
        "argv": sys.argv[1:],
        "location": redact(run.url),
        "throwaway_server": run.args.location is None,
        "key_prefix": run.prefix,
        "reps": run.args.reps,
        "asgi_reps": run.args.asgi_reps,
        "cap_seconds": run.args.cap,
        "scale": run.args.scale,
        "quick": run.args.quick,
        "work": {s.name: work(s, run.args) for s in SCENARIOS},
        "asgi_concurrency": run.args.concurrency,
        "pinned": None if cpus is None else {"measured_and_server": cpus[0], "sampler": cpus[1]},
        "backends": {b.key: {"label": b.label, "alias": b.alias} for b in run.backends},
        "raw_clients": "redis.Redis / redis.asyncio.Redis.from_url(url): redis-py's defaults",
        "python": platform.python_version(),
        "django": django.get_version(),
        "redis_py": redis.__version__,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "django_redis_ex": getattr(ex, "__version__", None),
        "django_redis_ex_source": source_id(ex),
        "redis_server": server.get("redis_version"),
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15%% of the work, 3 reps")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all work (smoke: 0.05)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 3)")
    parser.add_argument("--asgi-reps", type=int, default=3, help="repetitions of ASGI (3)")
    parser.add_argument(
        "--cap",
        type=float,
        help="seconds one measurement may run (2, --quick 1): past it, "
        "a slow backend's rate is taken from the work done so far",
    )
    parser.add_argument("--requests", type=int, help="ASGI requests per measurement (2000)")
    parser.add_argument("--concurrency", type=int, default=50, help="ASGI concurrency (50)")
    parser.add_argument("--location", help="use this Redis URL instead of a throwaway server")
    parser.add_argument(
        "--backend", action="append", default=[], help="another cache class (dotted path)"
    )
    parser.add_argument(
        "--scenario", action="append", default=[], help="run only scenarios with this prefix"
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs")
    parser.add_argument(
        "--max-seconds", type=float, default=1800, help="abort the whole run after this long"
    )
    args = parser.parse_args(argv)
    args.reps = max(1, args.reps or (3 if args.quick else 5))
    args.asgi_reps = max(1, args.asgi_reps)
    args.cap = args.cap or (1.0 if args.quick else 2.0)
    args.requests_given = args.requests is not None
    if args.requests is None:
        args.requests = 2000
    if args.requests < 1 or args.concurrency < 1 or args.scale <= 0:
        parser.error("--requests, --concurrency and --scale must be positive")
    return args


def pin(no_pin: bool) -> tuple[int, int | None] | None:
    """Pin this process (and so the redis-server it starts) to one CPU; the other's number."""
    if no_pin or not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {available[0]})
    return available[0], (available[1] if len(available) > 1 else None)


def watchdog(seconds: float, procs: Processes) -> None:
    """Bound the whole run: past ``seconds``, stop the children and exit."""

    def abort() -> None:
        print(f"bench: aborted after {seconds:.0f} s (--max-seconds)", file=sys.stderr)
        procs.stop_all()
        os._exit(3)

    timer = threading.Timer(seconds, abort)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    global _run
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Processes()
    watchdog(args.max_seconds, procs)
    cpus = pin(args.no_pin)  # before starting redis-server, which inherits the CPU
    prefix = f"bench:{secrets.token_hex(4)}:"
    monitor = None
    try:
        if args.location:
            url = args.location
            print(
                f"Using {redact(url)}: this writes keys under '{prefix}*' and deletes them at "
                "the end (SCAN + DEL; never FLUSHDB). That server is not pinned.",
                file=sys.stderr,
            )
        else:
            url = start_redis(procs)
        monitor = redis.Redis.from_url(url, socket_timeout=10)
        monitor.ping()
        backends, failed = configure_django(url, prefix, args.backend)
        raw_sync = redis.Redis.from_url(url)  # redis-py's defaults: the limit
        run = _run = Run(url, prefix, args, backends, raw_sync, monitor)
        for dotted in failed:
            try:
                import_string(dotted)
            except Exception as exc:
                run.error(Backend(dotted, None), "import", exc)
        for backend in backends[1:]:
            try:
                caches[str(backend.alias)].set("probe", 1)
            except Exception as exc:
                run.error(backend, "setup", exc)
        run.backends = [b for b in backends if b.key not in run.errors]
        chosen = [
            s for s in SCENARIOS if not args.scenario or s.name.startswith(tuple(args.scenario))
        ]
        app = ASGIHandler()
        sampler = None
        if any(s.kind == "asgi" for s in chosen):
            sampler = Sampler(procs, url, None if cpus is None else cpus[1])
        for scenario in chosen:
            run_scenario(run, scenario, app, sampler)
        results = {s.name: summarize_scenario(run, s.name) for s in chosen}
        print(table(run, results))
        report, target_rows = target_report(run)
        print(report)
        if args.json:
            document = {
                "results": results,
                "errors": run.errors,
                "targets": target_rows,
                "meta": meta(run, started, cpus),
            }
            Path(args.json).write_text(json.dumps(document, indent=1, default=str) + "\n")
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.location and monitor is not None:
            with contextlib.suppress(redis.RedisError):
                deleted = cleanup_keys(monitor, prefix)
                print(f"deleted {deleted} keys under '{prefix}*'", file=sys.stderr)
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
