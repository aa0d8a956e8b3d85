"""Benchmark django_redis_ex against raw redis-py and Django's own RedisCache.

Run from the repository root::

    python benchmarks/bench.py            # default run, several minutes
    python benchmarks/bench.py --quick    # one to two minutes
    python benchmarks/bench.py --quick --scale 0.05 --json out.json   # smoke test
    python benchmarks/bench.py --quick --topology single,sentinel,cluster   # about 2 minutes
    python benchmarks/bench.py --cluster-goals --reps 7   # issue 20's Cluster table, ~1 minute
    python benchmarks/bench.py --tags-pages --reps 3   # issue 21: tags and pages, ~2.5 minutes
    python benchmarks/bench.py --stale   # get_or_set at expiry, stale_while_revalidate, ~1 minute
    python benchmarks/bench.py --health  # the cost of reading cache.stats() under load, ~1 minute

One run, one Redis: the raw sync and asyncio clients of redis-py (the limit), both classes of
django_redis_ex on their sync and async paths, Django's RedisCache, the variants below, and
any ``--backend``. Each measurement does a fixed amount of work; backends are interleaved in
every repetition and each figure is also given as a ratio to the raw client of the same kind,
paired by repetition. The main table's columns have short headings, listed above it:

- ``EX+cc``, ``AEX+cc``: both classes with OPTIONS ``{"client_cache": True}`` (reads answered
  from process memory, kept correct by the server's invalidations).
- ``AEX-mux``: AsyncRedisEXCache with ``{"multiplex": False}`` (concurrent async calls of one
  loop no longer share connections); only the scenarios that multiplexing may change (threads,
  async, the ASGI async view).
- ``EX+sig``: RedisEXCache with OPTIONS ``{"sign_values": True}`` (an HMAC-SHA256 stored with
  every value and checked before any value is deserialized); get and set only. The codec
  section measures it on its 2 KB value too (``signed``).
- ``vcache``, ``vcache+csc``: django-vcache (``django_vcache.backend.ValkeyCache``, a Rust
  driver with one multiplexed connection; Python 3.12+) with its defaults, and with OPTIONS
  ``{"CLIENT_SIDE_CACHE": {"ENABLED": True}}`` (its defaults: MAX_SIZE 10,000, TTL 300 s). It
  stores msgpack, not Django's pickle format, and its incr creates a missing key; like every
  backend it is seeded through itself (the counter exists), so every scenario applies to it.
- ``main:EX``, ``main:AEX``, ``main:EX+cc``, ...: with ``--baseline PATH``, the rows of our
  two classes above (same OPTIONS, same scenarios) for another copy of the module, such as
  the last commit's (``git show HEAD:django_redis_ex.py > /tmp/drx_main.py``), loaded from
  that file as ``django_redis_ex_baseline``: the module checked out against it, in one run.

A row that cannot be measured here is skipped with the reason under the table and in
``--json`` ("skipped"), not counted as an error: django-vcache where it is not installed (or
does not import), and a variant whose OPTIONS the module checked out rejects at configuration
(ImproperlyConfigured: an option not implemented yet). Any other failure is an error.

Connections: for each async scenario, "used" counts this process's TCP connections to Redis
that carried traffic during the measured burst (the kernel's byte counts, TCP_INFO, read
before and after it: every client's sockets alike, redis-py's or a Rust driver's; Linux only,
"?" elsewhere), and "opened" the connections the server received during the warm-up and the
burst (a pool kept from an earlier event loop opens none). ``async.get_500`` is ``aget`` at 500
concurrent tasks on one loop, reported mainly for that count; its raw client is redis.asyncio
on redis-py's BlockingConnectionPool of 100, since the default pool refuses past 100
connections (single topology only). The ASGI table gives, per backend, the connections the
server received (opened), those used during the measured requests, and the peak of connected
clients above the baseline; the ASGI default is 2,000 requests at concurrency 50 (--quick:
300).

Codec cost (``--codecs``, on unless ``--no-codecs`` or ``--scenario`` leaves none of its
scenarios): RedisEXCache with the JSON serializer and with each compressor available (zlib,
and zstd and lz4 if installed), on a 2 KB compressible value, each as a ratio to the plain
RedisEXCache (pickle, no compression) on the same value, interleaved in the same run. It
covers the sync get/set, get_many/set_many and async get/set scenarios, at a quarter of their
work; the main table keeps its 100-byte value.

``--topology single,sentinel,cluster`` (repeatable; default single) also measures each listed
deployment, started on free loopback ports and stopped before the next: Sentinel is a master,
its replica and three sentinels, Cluster three primaries with a replica each. The sync and
async scenarios run there for both classes and the raw clients of that topology (redis-py's
Sentinel pool, RedisCluster: ``mget_nonatomic`` and a non-transactional pipeline for the
many-key calls; the asyncio RedisCluster is initialized before its first burst, which redis-py
8.1 sometimes fails otherwise). Cluster also has both classes with ``client_cache`` (OPTIONS
``{"cluster": True, "client_cache": True}``; skipped with the reason while the module rejects
it) and django-vcache in ``CLUSTER_MODE`` (LOCATION: the seed URLs, comma-separated), under
their short headings. Django's RedisCache (one server only), ``--backend`` classes, the other
variants and the ``--baseline`` rows, ``async.get_500`` and the ASGI scenarios (Django's
request handling, the same on any topology) are left out there. Each topology adds about 2 s
of setup and about the time of the single run's sync and async scenarios for its backends
(half a minute with --quick, two to three minutes without).

``--tags-pages`` runs issue 21's benchmark instead (``benchmarks/tags_pages.py``, which reuses
this module): tagged reads against the plain cache on each topology, the cost of
``invalidate_tags`` (1 to 100 tags; one tag of 1,000 or 100,000 entries; ``delete_pattern`` once
for contrast), and ``django_redis_ex.cache_page`` against Django's ``cache_page`` on ASGI and WSGI;
every other argument is that script's (``--reps``, ``--json``, ``--part``, ...; about 3.5 minutes),
and the run exits when it ends.

``--stale`` runs the benchmark of ``get_or_set`` at expiry instead (``benchmarks/stale.py``, which
reuses this module): the p50/p99/max latency of ``aget_or_set`` on a key that expires every
second and takes 200 ms to compute, at 200 concurrent tasks, without ``stale_while_revalidate``
(stampede protection: the others wait) and with it (the stale value at once), for both classes,
``get_or_set`` from 32 threads, and Django's RedisCache for reference; every other argument is
that script's (``--reps``, ``--json``, ...; about 1 minute), and the run exits when it ends.

``--health`` runs the benchmark of reading ``cache.stats()`` under load instead
(``benchmarks/health.py``, which reuses this module): the throughput of ``aget`` hits at 100
tasks and of ``get`` hits from 8 threads, without and with a reader calling ``stats()`` every
10 ms, and their ratio, for both classes, on one server and with client_cache and two replicas
(the largest report), and the cost of one ``stats()`` call; every other argument is that
script's (``--reps``, ``--json``, ``--intervals``, ...; about 1 minute), and the run exits when
it ends.

``--cluster-goals`` measures what issue 20's "Done when" compares, in one run: ``get`` and
``aget`` at 100 tasks (``sync.get_hit``, ``async.get``) on the single server (raw, EX, AEX:
context) and on the 3-primary Cluster, where both classes on the single server are rows of
the Cluster section too, interleaved with the Cluster's rows repetition by repetition. It
implies ``--topology single,cluster``, ``--no-codecs`` and ``--pin split`` (the servers on
one CPU, this process on the other, as the issue measured), and ends with a table of medians
of per-rep ratios, for EX and AEX: ours / django-vcache and ours / raw RedisCluster for
``aget`` and ``get``, ``get`` on Cluster / on one server, and ``get`` with client_cache / raw;
each with the issue's target and the columns that reach it (``--json``: "cluster_goals").

Without ``--location`` a throwaway ``redis-server`` is started on a free loopback port and
stopped at the end; ``--location`` applies to the single topology only. The servers, Sentinel
and Cluster are started by the test suite's harness (``test_django_redis_ex.py``, imported
from the repository root; it needs pytest: ``pip install -e '.[test]'``). Every redis-server
and sentinel this process starts shares its CPU, the helper that samples the server's
connected clients runs on the other (``--no-pin`` turns pinning off): on a 2-core machine a
GET loop is several times faster on a shared CPU, and unpinned figures flip between the two.
``--pin split`` starts every server on the first CPU and runs this process on the second.

The raw clients use redis-py's defaults (no socket timeout; the pool of ``async.get_500``
aside): they are the limit. Every wait is bounded all the same: asyncio work by ``wait_for``,
threads by ``join`` timeouts, server setup by deadlines, and the whole run by
``--max-seconds``, past which the servers are stopped and the process exits; every process it
starts is stopped by PID then, at exit and on Ctrl-C. Before that, every cache is closed
(``close()``, then ``aclose()``, within 10 s), the raw clients too, and the client-side
caches' tracking connections (``django_redis_ex.close_client_caches()``): no warning that
one was lost when the server stops.

It prints tables to read; ``--json`` also writes every figure and how it was measured
(arguments, versions, machine). It sets no pass/fail targets: its exit status never depends
on a figure (``--cluster-goals`` quotes issue 20's, and which columns reach them).
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
import importlib.metadata
import importlib.util
import json
import os
import pickle
import platform
import secrets
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import django
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponse
from django.test.utils import override_settings  # resets the caches on entry and exit
from django.urls import path
from django.utils.module_loading import import_string

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # the test harness; django_redis_ex need not be installed

URLCONF = "bench_urls"
# Before the harness: the test module configures Django only if nobody has. Each run's
# CACHES are applied with override_settings once its servers are known.
settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-" + secrets.token_hex(16),
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=URLCONF,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    USE_TZ=True,
)
django.setup()

from test_django_redis_ex import (  # noqa: E402
    CLEANUP,
    ClusterSetup,
    RedisServer,
    SentinelSetup,
    asgi_get,
    redact,
)

RAW = "redis-py"
EX = "django_redis_ex.RedisEXCache"
AEX = "django_redis_ex.AsyncRedisEXCache"
DJANGO = "django.core.cache.backends.redis.RedisCache"
VCACHE = "django_vcache.backend.ValkeyCache"  # django-vcache: a Rust driver, Python 3.12+
LABELS = {RAW: "raw redis-py", EX: "RedisEXCache", AEX: "AsyncRedisEXCache", DJANGO: "Django"}

VALUE = b"v" * 100  # the cached value: 100 bytes
PAYLOAD = pickle.dumps(VALUE, pickle.HIGHEST_PROTOCOL)  # what the backends store for it
TIMEOUT = 300  # Django's default TIMEOUT: every SET carries EX 300
MANY_KEYS = [f"many:{i}" for i in range(100)]
THREADS = 8
TASKS = 100
WIDE_TASKS = 500  # the async scenario that counts connections at 500 concurrent calls
RAW_POOL = 100  # redis-py's asyncio pool: it refuses more connections than this
SAMPLE_INTERVAL = 0.003  # seconds between two INFO clients of the sampler
STEP_TIMEOUT = 300.0  # seconds one measurement may take before it is abandoned
CLOSE_TIMEOUT = 10.0  # seconds closing the caches may take before the servers are stopped
CHUNK = 10  # operations between two looks at the clock
QUICK = 0.15  # share of the default work that --quick does

# The codec-cost section: a value large enough to be compressed (2,072 bytes pickled, 2,815 as
# the JSON serializer writes it), and which serializer or compressor each variant uses.
CODEC_VALUE = {
    "title": "Cached fragment of a product listing",
    "items": [
        {
            "id": i,
            "name": f"Product number {i}",
            "price": "19.99",
            "summary": f"Product {i}: a sturdy, dependable widget for everyday use.",
            "in_stock": i % 3 != 0,
        }
        for i in range(20)
    ],
}
PLAIN = "pickle"  # the reference variant: Django's format, no compression
CODECS: dict[str, tuple[dict[str, Any], str | None]] = {  # OPTIONS, module it needs
    PLAIN: ({}, None),
    "json": ({"serializer": "json"}, None),
    "zlib": ({"compressor": "zlib"}, None),
    "zstd": ({"compressor": "zstd"}, "zstandard"),
    "lz4": ({"compressor": "lz4"}, "lz4.frame"),
    "signed": ({"sign_values": True}, None),  # HMAC-SHA256 of every value (2 KB here)
}
CODEC_SCENARIOS: tuple[str, ...] = ("sync.get_hit", "sync.set", "sync.get_many")
CODEC_SCENARIOS += ("sync.set_many", "async.get", "async.set")
CODEC_SHARE = 0.25  # share of a scenario's work that the codec section does

TOPOLOGIES = ("single", "sentinel", "cluster")

TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux: per-socket traffic counters


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
    tasks: int = TASKS  # concurrent tasks of an async scenario


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
    Scenario(
        f"async.get_{WIDE_TASKS}", "async", f"aget, {WIDE_TASKS} tasks", "ops", 10_000, WIDE_TASKS
    ),
    Scenario("asgi.async_view", "asgi", "ASGI async view", "requests", 2_000),
    Scenario("asgi.sync_view", "asgi", "ASGI sync view", "requests", 2_000),
]


@dataclass(frozen=True)
class Backend:
    key: str  # what results are filed under: the cache class's dotted path, RAW, or a codec
    alias: str | None  # cache alias in CACHES; None for the raw clients
    name: str = ""  # the label, if not derived from ``key``
    short: str = ""  # the main table's column heading, if not the label
    only: tuple[str, ...] = ()  # prefixes of the scenarios it runs; () for all
    optional: bool = False  # OPTIONS that this version may not know: a rejection skips it

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = self.key.split(".")
        return LABELS.get(self.key, f"{parts[0]}.{parts[-1]}" if len(parts) > 2 else self.key)

    @property
    def heading(self) -> str:
        return self.short or self.label

    def runs(self, scenario: str) -> bool:
        return not self.only or scenario.startswith(self.only)


@dataclass(frozen=True)
class Row:
    """A row of the main table: a cache class and its OPTIONS."""

    key: str  # what its results are filed under
    dotted: str  # BACKEND
    label: str
    short: str  # column heading
    options: dict[str, Any]
    only: tuple[str, ...] = ()  # see Backend
    optional: bool = False  # see Backend
    module: str | None = None  # a package that may be missing: the row is skipped, with a note


# Both classes with the client-side store: on the single server and on Cluster alike.
CLIENT_CACHE_ROWS = [
    Row(
        f"{EX}+client_cache",
        EX,
        "RedisEXCache +client_cache",
        "EX+cc",
        {"client_cache": True},
        optional=True,
    ),
    Row(
        f"{AEX}+client_cache",
        AEX,
        "AsyncRedisEXCache +client_cache",
        "AEX+cc",
        {"client_cache": True},
        optional=True,
    ),
]

# What the main table measures after the raw clients, in this order. The variants' OPTIONS
# may be newer than the module checked out: one it rejects is skipped with the reason.
# django-vcache (django_vcache/backend.py, ValkeyCache.__init__): LOCATION a redis:// URL;
# OPTIONS SERIALIZER (msgpack), COMPRESS_MIN_LEN (1024), IGNORE_EXCEPTIONS, CLUSTER_MODE, and
# CLIENT_SIDE_CACHE {"ENABLED", "MAX_SIZE" (10,000), "TTL" (300 s)}, off by default.
ROWS = [
    Row(EX, EX, "RedisEXCache", "EX", {}),
    Row(AEX, AEX, "AsyncRedisEXCache", "AEX", {}),
    # Django's RedisCache waits forever on a frozen server; the timeout bounds that, and only.
    Row(DJANGO, DJANGO, "Django", "Django", {"socket_timeout": 10, "socket_connect_timeout": 5}),
    *CLIENT_CACHE_ROWS,
    Row(
        f"{AEX}-multiplex",
        AEX,
        "AsyncRedisEXCache -multiplex",
        "AEX-mux",
        {"multiplex": False},
        only=("threads.", "async.", "asgi.async_view"),  # what multiplexing may change
        optional=True,
    ),
    Row(
        f"{EX}+sign_values",
        EX,
        "RedisEXCache +sign_values",
        "EX+sig",
        {"sign_values": True},
        only=("sync.get_hit", "sync.set", "async.get", "async.set"),  # get/set, 100 bytes
        optional=True,
    ),
    Row(VCACHE, VCACHE, "django-vcache", "vcache", {}, module="django_vcache"),
    Row(
        f"{VCACHE}+CLIENT_SIDE_CACHE",
        VCACHE,
        "django-vcache +CLIENT_SIDE_CACHE",
        "vcache+csc",
        {"CLIENT_SIDE_CACHE": {"ENABLED": True}},
        module="django_vcache",
    ),
]
OPTIONS_OF = {row.key: row.options for row in ROWS}
# What the Cluster section measures besides the raw clients and both classes (OPTIONS added to
# the topology's own, {"cluster": True}); django-vcache's LOCATION there is its seed URLs,
# comma-separated (ValkeyCache: CLUSTER_MODE splits it on ",").
CLUSTER_ROWS = [
    *CLIENT_CACHE_ROWS,
    Row(
        VCACHE,
        VCACHE,
        "django-vcache CLUSTER_MODE",
        "vcache",
        {"CLUSTER_MODE": True},
        module="django_vcache",
    ),
]
# --cluster-goals: both classes on the single server too, as rows of the Cluster section
# (interleaved with the Cluster's rows, repetition by repetition).
ON_ONE = "@single"  # the suffix of their keys
GOALS_SCENARIOS = ("sync.get_hit", "async.get")


@dataclass(frozen=True)
class Goal:
    """A line of the --cluster-goals table: the median of per-rep ratios of ``mine`` to
    ``theirs`` in the Cluster section's ``scenario``, for our two classes (EX, AEX)."""

    scenario: str
    what: str
    mine: tuple[str, str]  # the rows of the EX and the AEX column
    theirs: tuple[str, str]  # what each is divided by
    target: float | None  # what issue 20 asks (at least), None for context


GOALS = [
    Goal("async.get", "aget, 100 tasks: ours / vcache", (EX, AEX), (VCACHE, VCACHE), 1.0),
    Goal("async.get", "aget, 100 tasks: ours / raw", (EX, AEX), (RAW, RAW), 3.0),
    Goal("sync.get_hit", "get: ours / vcache", (EX, AEX), (VCACHE, VCACHE), 0.9),
    Goal("sync.get_hit", "get: ours / raw", (EX, AEX), (RAW, RAW), None),
    Goal(
        "sync.get_hit",
        "get: ours on Cluster / on one server",
        (EX, AEX),
        (EX + ON_ONE, AEX + ON_ONE),
        0.8,
    ),
    Goal(
        "sync.get_hit",
        "get, client_cache: ours / raw",
        (f"{EX}+client_cache", f"{AEX}+client_cache"),
        (RAW, RAW),
        10.0,
    ),
]
BASELINE = "django_redis_ex_baseline"  # the module name of a --baseline file
VCACHE_NOTE = [
    "django-vcache: every scenario applies to it. It stores msgpack behind a 1-byte tag, not",
    "  Django's pickle format (the 100-byte value: 103 bytes stored); every backend is seeded",
    "  through itself. Its incr is a bare INCRBY that creates a missing key (ours: a Lua script",
    "  that fails on one); the counter is seeded, so both increment an existing key. Its",
    "  client-side cache answers hits from memory: no connection used for them.",
]


@dataclass
class Run:
    """One section of the benchmark (the main table, the codec cost, a topology): its
    deployment, raw clients, backends, value and results."""

    topology: Topology
    prefix: str  # every key of this run starts with it
    args: argparse.Namespace
    backends: list[Backend]
    raw_sync: Any  # redis.Redis, or a RedisCluster
    monitor: redis.Redis | None = None  # INFO only, opened before any measurement (for ASGI)
    section: str = ""  # "", "codecs" or the topology's name: tags progress and errors
    value: Any = VALUE  # what the caches store (the raw clients store PAYLOAD)
    reference: str = RAW  # ratios are to this backend's figures
    share: float = 1.0  # of each scenario's work
    reps: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)  # shared by all sections
    failed: set[str] = field(default_factory=set)  # backends with an error in this section
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # not measured, and why
    labels: dict[str, str] = field(default_factory=dict)  # of the backends with an error
    other_ports: frozenset[int] = frozenset()  # the single server's, for rows on it
    columns: list[Backend] = field(default_factory=list)  # a topology's, measured or not

    @property
    def url(self) -> str:
        return self.topology.url

    def data_ports(self) -> frozenset[int]:
        """The ports whose connections are counted: the topology's, and with --cluster-goals
        the single server's (the rows of the Cluster section that are on it)."""
        return self.topology.data_ports() | self.other_ports

    def raw_key(self, name: str) -> str:
        return f"{self.prefix}raw:1:{name}"

    def error(self, backend: Backend, where: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        where = f"{self.section} {where}" if self.section else where
        self.errors.setdefault(backend.key, {})[where] = message
        self.failed.add(backend.key)
        self.labels[backend.key] = backend.label
        print(f"  ! {backend.label} {where}: {message}", file=sys.stderr, flush=True)

    def skip(self, backend: Backend, reason: str) -> None:
        """Leave ``backend`` out of this section: not an error (a missing package, an option
        this version does not know yet); the tables and --json say why."""
        self.skipped[backend.key] = {"label": backend.label, "reason": reason}
        self.failed.add(backend.key)
        print(f"  - {backend.label}: not measured: {reason}", file=sys.stderr, flush=True)


class RawAsync:
    """The raw asyncio client of the running loop (a RedisCluster on a cluster)."""

    client: Any = None


_run: Run | None = None  # for the views


def work(scenario: Scenario, args: argparse.Namespace) -> int:
    """Operations (calls, requests) of one measurement: --requests is taken as given."""
    if scenario.kind == "asgi" and args.requests_given:
        return int(args.requests)
    base: int = args.requests if scenario.kind == "asgi" else scenario.base
    return max(1, round(base * float(args.scale) * (QUICK if args.quick else 1.0)))


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` workers, none empty."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


# ---------------------------------------------------------------------------
# Deployments (their servers come from the test harness), the sampler, cleanup
# ---------------------------------------------------------------------------


def start_redis() -> RedisServer:
    """A throwaway redis-server on a free loopback port, once it answers."""
    try:
        with on_server_cpu():
            return RedisServer()
    except RuntimeError as exc:
        sys.exit(f"{exc}, or use --location")


class Topology:
    """One Redis deployment: how its raw clients and the cache classes reach it."""

    name = "single"
    multi_get = "mget"  # the raw clients' method for get_many

    def __init__(self, url: str, servers: list[RedisServer]) -> None:
        self.url = url  # of the server, the master or a primary: what a report names
        self.servers = servers  # what this run started for it

    def describe(self) -> str:
        return redact(self.url)

    def location(self) -> tuple[Any, dict[str, Any]]:
        """LOCATION and OPTIONS of the cache classes."""
        return self.url, {}

    def vcache_location(self) -> str:
        """django-vcache's LOCATION (one string)."""
        return self.url

    def raw_sync(self) -> Any:
        return redis.Redis.from_url(self.url)

    async def raw_async(self, tasks: int = TASKS) -> Any:
        """A raw asyncio client for the running loop, with redis-py's defaults. Past the 100
        connections of its pool, which it refuses, ``tasks`` concurrent calls get redis-py's
        BlockingConnectionPool of that size, which waits for a free one instead."""
        if tasks <= RAW_POOL:
            return redis.asyncio.Redis.from_url(self.url)
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            self.url, max_connections=RAW_POOL, timeout=STEP_TIMEOUT
        )
        return redis.asyncio.Redis.from_pool(pool)  # it closes the pool with it

    async def close_async(self, client: Any) -> None:
        await client.aclose()

    def close_sync(self, client: Any) -> None:
        client.close()

    def pids(self) -> list[int]:
        return [server.process.pid for server in self.servers if server.process is not None]

    def data_ports(self) -> frozenset[int]:
        """The TCP ports of the servers that hold the keys (sentinels are not among them)."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            return frozenset()  # a unix socket: not counted
        return frozenset({parts.port or 6379})

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class SentinelTopology(Topology):
    """A master, its replica and three sentinels (quorum 2) watching them."""

    name = "sentinel"

    def __init__(self) -> None:
        self.setup = SentinelSetup(down_after_ms=1500)
        super().__init__(f"{self.setup.master.url}/0", self.setup.servers)
        self.sentinels = [("127.0.0.1", sentinel.port) for sentinel in self.setup.sentinels]

    def data_ports(self) -> frozenset[int]:
        return frozenset(s.port for s in self.setup.servers if s not in self.setup.sentinels)

    def describe(self) -> str:
        sentinels = ", ".join(str(port) for _host, port in self.sentinels)
        return (
            f"master on port {self.setup.master.port} + 1 replica, sentinels on ports {sentinels}"
        )

    def location(self) -> tuple[Any, dict[str, Any]]:
        return self.setup.location(0)

    def raw_sync(self) -> Any:
        manager = redis.sentinel.Sentinel(self.sentinels)
        pool = redis.sentinel.SentinelConnectionPool(self.setup.service, manager, is_master=True)
        return redis.Redis(connection_pool=pool)

    async def raw_async(self, tasks: int = TASKS) -> Any:
        manager = redis.asyncio.sentinel.Sentinel(self.sentinels)
        pool = redis.asyncio.sentinel.SentinelConnectionPool(
            self.setup.service, manager, is_master=True
        )
        return redis.asyncio.Redis(connection_pool=pool)

    async def close_async(self, client: Any) -> None:
        await client.aclose()
        await client.connection_pool.disconnect()  # the client does not own its pool
        await client.connection_pool.sentinel_manager.aclose()

    def close_sync(self, client: Any) -> None:
        client.connection_pool.disconnect()
        for sentinel in client.connection_pool.sentinel_manager.sentinels:
            sentinel.close()


class ClusterTopology(Topology):
    """Three primaries with a replica each, made by the test harness's ``ClusterSetup``."""

    name = "cluster"
    multi_get = "mget_nonatomic"

    def __init__(self) -> None:
        self.setup = ClusterSetup()
        self.ports = [node.port for node in self.setup.nodes]
        super().__init__(f"{self.setup.nodes[0].url}/0", self.setup.nodes)

    def describe(self) -> str:
        return f"3 primaries + 3 replicas on ports {', '.join(map(str, self.ports))}"

    def data_ports(self) -> frozenset[int]:
        return frozenset(self.ports)

    def location(self) -> tuple[Any, dict[str, Any]]:
        return self.setup.location()

    def vcache_location(self) -> str:
        """The seed URLs of ours (two nodes; the client finds the others), comma-separated."""
        seeds, _options = self.setup.location()
        return ",".join(seeds)

    def raw_sync(self) -> Any:
        return redis.cluster.RedisCluster("127.0.0.1", self.ports[0])

    async def raw_async(self, tasks: int = TASKS) -> Any:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0])
        # Before the 100 tasks of the warm-up: their first calls on a client that is not yet
        # initialized race (each may start initialize(), which replaces the nodes under the
        # others: AttributeError '_writer' None, now and then).
        await client.initialize()
        return client


def start_topology(name: str) -> Topology:
    with on_server_cpu():
        return {"sentinel": SentinelTopology, "cluster": ClusterTopology}[name]()


_server_cpu: int | None = None  # with --pin split: the CPU that the servers are started on


@contextlib.contextmanager
def on_server_cpu() -> Iterator[None]:
    """Start servers inside it: with --pin split, on the servers' CPU (a child inherits the
    affinity of the thread that starts it), this thread back on its own CPU afterwards; the
    other threads (the drivers', the executors') keep theirs. Otherwise nothing changes."""
    if _server_cpu is None:
        yield
        return
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {_server_cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


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

    def __init__(self, url: str, cpu: int | None) -> None:
        argv = [sys.executable, "-c", _SAMPLER, url, str(-1 if cpu is None else cpu)]
        argv += [str(SAMPLE_INTERVAL), "3600"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        CLEANUP.register(self)
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

    def begin(self) -> int:
        """Start a window; the connected clients now."""
        return int(self._ask("start")[0])

    def end(self) -> tuple[int, int]:
        """End the window: its peak of connected clients and how many samples it took."""
        peak, samples = self._ask("stop")
        return int(peak), int(samples)

    def stop(self) -> None:
        """Kill the helper by its PID."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


Traffic = dict[tuple[Any, ...], tuple[int, int]]


def socket_traffic(ports: frozenset[int]) -> Traffic | None:
    """Bytes sent (acknowledged) and received so far on each TCP connection of this process
    to one of ``ports``, by local address, from the kernel (TCP_INFO): it sees every client's
    sockets alike, redis-py's and a Rust driver's. None where it cannot be read (not Linux)."""
    if TCP_INFO is None or not ports or not os.path.isdir("/proc/self/fd"):
        return None
    traffic: Traffic = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            fd = os.dup(int(name))  # a socket object of our own, closed below; not the owner's
        except (OSError, ValueError):
            continue  # closed meanwhile, or the directory's own descriptor
        try:
            with socket.socket(fileno=fd) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[1] not in ports:
                    continue
                info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 192)
                if len(info) >= 136:  # tcpi_bytes_acked, tcpi_bytes_received: Linux 4.1+
                    traffic[sock.getsockname()] = struct.unpack_from("QQ", info, 120)
        except OSError:
            continue  # not connected (yet, or any more)
    return traffic


def connections_used(before: Traffic | None, after: Traffic | None) -> int | None:
    """How many connections carried traffic between two ``socket_traffic`` looks (one opened
    and closed between them is not seen: the server's count of connections received is)."""
    if before is None or after is None:
        return None
    return sum(1 for address, counts in after.items() if counts != before.get(address, (0, 0)))


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


def close_backends(aliases: Iterable[str] | None = None) -> list[Any]:
    """Close the caches of ``aliases`` (default: every alias of the CACHES in force), as this
    thread holds them, before their servers are stopped: each by ``close()``, then by
    ``aclose()`` on an event loop of their own that shuts down as ``asyncio.run`` does (the
    path on which the libraries close a loop's pools), all within CLOSE_TIMEOUT (a helper
    thread; past that the servers are stopped all the same). The caches closed."""
    objects = []
    for alias in list(settings.CACHES if aliases is None else aliases):
        with contextlib.suppress(Exception):  # a cache that cannot be made holds nothing
            objects.append(caches[alias])
    failures: list[str] = []

    async def aclose_all() -> None:
        for cache in objects:
            try:
                await cache.aclose()
            except Exception as exc:
                failures.append(f"{cache!r}.aclose(): {type(exc).__name__}: {exc}")

    def close_all() -> None:
        for cache in objects:
            try:
                cache.close()
            except Exception as exc:
                failures.append(f"{cache!r}.close(): {type(exc).__name__}: {exc}")
        try:
            asyncio.run(asyncio.wait_for(aclose_all(), CLOSE_TIMEOUT))
        except Exception as exc:
            failures.append(f"aclose(): {type(exc).__name__}: {exc}")

    closing = threading.Thread(target=close_all, name="bench: closing the caches", daemon=True)
    closing.start()
    closing.join(CLOSE_TIMEOUT + 1)
    if closing.is_alive():
        failures.append(f"the caches were not closed within {CLOSE_TIMEOUT:.0f} s")
    for failure in failures:
        print(f"bench: closing the caches: {failure}", file=sys.stderr, flush=True)
    return objects


def close_client_caches() -> None:
    """End the tracking connections of the client-side caches (ours, and a --baseline
    module's if it can), so that stopping the server logs no "tracking connection was lost"."""
    for name in ("django_redis_ex", BASELINE):
        close = getattr(sys.modules.get(name), "close_client_caches", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close(timeout=CLOSE_TIMEOUT)


# ---------------------------------------------------------------------------
# Django: settings, urls and views
# ---------------------------------------------------------------------------


def cache_entry(dotted: str, location: Any, key_prefix: str, options: dict[str, Any]) -> Any:
    return {
        "BACKEND": dotted,
        "LOCATION": location,
        "KEY_PREFIX": key_prefix,
        "TIMEOUT": TIMEOUT,
        "OPTIONS": options,
    }


def baseline_rows(path: str) -> list[Row]:
    """The rows of our two classes in ROWS, for the module file ``path`` (another version of
    django_redis_ex) loaded as BASELINE: keys and headings "main:EX", "main:EX+cc", ..."""
    spec = importlib.util.spec_from_file_location(BASELINE, path)
    if spec is None or spec.loader is None:
        sys.exit(f"--baseline {path}: not a Python module file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE] = module
    spec.loader.exec_module(module)
    rows = []
    for row in ROWS:
        if row.dotted in (EX, AEX):
            dotted = row.dotted.replace("django_redis_ex", BASELINE)
            short = f"main:{row.short}"
            label = f"main {row.label}"
            rows.append(Row(short, dotted, label, short, row.options, row.only, row.optional))
            OPTIONS_OF[short] = row.options
    return rows


def main_backends(
    caches_setting: dict[str, Any], url: str, prefix: str, rows: list[Row]
) -> tuple[list[Backend], list[str], dict[Backend, str]]:
    """One alias per row of the main table (ROWS, the --baseline rows, then --backend ones):
    the backends, the failed imports, and the rows skipped because a package they need is
    missing, with the reason."""
    backends = [Backend(RAW, None, short="raw")]
    failed = []
    skipped: dict[Backend, str] = {}
    for i, row in enumerate(rows):
        alias = f"b{i}"
        backend = Backend(row.key, alias, row.label, row.short, row.only, row.optional)
        if row.module is not None:
            missing = module_missing(row.module)
            if missing:
                skipped[backend] = missing
                continue
        try:
            import_string(row.dotted)
        except Exception as exc:  # reported by main(); the run goes on without it
            if row.module is not None:
                skipped[backend] = f"{row.dotted} does not import: {type(exc).__name__}: {exc}"
            else:
                failed.append(row.dotted)
            continue
        caches_setting[alias] = cache_entry(row.dotted, url, f"{prefix}{alias}", row.options)
        backends.append(backend)
    return backends, failed, skipped


def module_missing(module: str) -> str:
    """Why ``module`` cannot be used here, or "" if it is installed."""
    if importlib.util.find_spec(module) is not None:
        return ""
    here = f"this is Python {platform.python_version()}"
    if module == "django_vcache":
        return f"django-vcache is not installed (it needs Python 3.12+; {here})"
    return f"{module} is not installed ({here})"


def codec_backends(caches_setting: dict[str, Any], url: str, prefix: str) -> list[Backend]:
    """One RedisEXCache alias per codec variant whose module is installed."""
    backends = []
    for name, (options, module) in CODECS.items():
        if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        alias = f"codec-{name}"
        caches_setting[alias] = cache_entry(EX, url, f"{prefix}{alias}", options)
        label = f"{name} (plain)" if name == PLAIN else name
        backends.append(Backend(name, alias, label))
    return backends


def topology_backends(
    topology: Topology, prefix: str, single: str | None = None
) -> tuple[list[Backend], dict[str, Any], dict[Backend, str]]:
    """Both classes on ``topology`` (Django's RedisCache knows one server only), on Cluster
    CLUSTER_ROWS too, and given ``single`` (the single server's URL, --cluster-goals) both
    classes on that server: the backends, their CACHES entries, and the rows skipped because
    a package they need is missing, with the reason."""
    location, options = topology.location()
    rows = [Row(EX, EX, "", "", {}), Row(AEX, AEX, "", "", {})]
    if topology.name == "cluster":
        rows += CLUSTER_ROWS
    backends, entries = [Backend(RAW, None, short="raw")], {}
    skipped: dict[Backend, str] = {}
    for i, row in enumerate(rows):
        alias = f"{topology.name}-{i}"
        backend = Backend(row.key, alias, row.label, row.short, row.only, row.optional)
        missing = "" if row.module is None else module_missing(row.module)
        if missing:
            skipped[backend] = missing
            continue
        where, their_options = location, {**options, **row.options}
        if row.dotted == VCACHE:  # its own OPTIONS (CLUSTER_MODE), not ours
            where, their_options = topology.vcache_location(), row.options
        entries[alias] = cache_entry(row.dotted, where, f"{prefix}{alias}", their_options)
        backends.append(backend)
    if single is not None:
        for dotted, short in ((EX, "EX"), (AEX, "AEX")):
            alias = f"{topology.name}-single-{short}"
            entries[alias] = cache_entry(dotted, single, f"{prefix}{alias}", {})
            label = f"{LABELS[dotted]} on the single server"
            backends.append(Backend(dotted + ON_ONE, alias, label, f"{short}@1"))
    return backends, entries, skipped


def install_urlconf() -> None:
    """The ROOT_URLCONF module: the URLs of the ASGI views."""
    urls = types.ModuleType(URLCONF)
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("async/<str:alias>/", async_view),
        path("sync/<str:alias>/", sync_view),
    ]
    sys.modules[URLCONF] = urls


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
        for name in MANY_KEYS:  # not MSET: on a cluster, the keys are in different slots
            pipe.set(run.raw_key(name), PAYLOAD)
        pipe.execute()
        return
    cache = caches[backend.alias]
    cache.set("hit", run.value, None)
    cache.set("counter", 0, None)
    cache.set_many(dict.fromkeys(MANY_KEYS, run.value), None)


def sync_op(run: Run, backend: Backend, scenario: str) -> Callable[[], Any]:
    """One sync operation of ``scenario``; resolves ``caches[alias]`` in the calling thread."""
    op = scenario.split(".")[1]
    op = "get_hit" if op == "get" else op
    if backend.alias is not None:
        cache = caches[backend.alias]
        return {
            "get_hit": functools.partial(cache.get, "hit"),
            "get_miss": functools.partial(cache.get, "miss"),
            "set": functools.partial(cache.set, "set", run.value),
            "get_many": functools.partial(cache.get_many, MANY_KEYS),
            "set_many": functools.partial(cache.set_many, dict.fromkeys(MANY_KEYS, run.value)),
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
        "get_many": functools.partial(getattr(client, run.topology.multi_get), many),
        "set_many": set_many,
        "incr": functools.partial(client.incr, key("counter")),
    }
    return ops[op]


def async_op(run: Run, backend: Backend, scenario: str) -> Callable[[], Awaitable[Any]]:
    """One async operation of ``scenario``, for the running loop."""
    op = scenario.split(".")[1].removesuffix(f"_{WIDE_TASKS}")  # "get_500": get
    if backend.alias is not None:
        cache = caches[backend.alias]
        return {
            "get": functools.partial(cache.aget, "hit"),
            "set": functools.partial(cache.aset, "aset", run.value),
            "get_many": functools.partial(cache.aget_many, MANY_KEYS),
            "set_many": functools.partial(cache.aset_many, dict.fromkeys(MANY_KEYS, run.value)),
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
        "get_many": functools.partial(getattr(client, run.topology.multi_get), many),
        "set_many": set_many,
    }
    return aops[op]


@contextlib.asynccontextmanager
async def raw_async_client(run: Run, tasks: int = TASKS) -> Any:
    """The raw asyncio client with redis-py's defaults, built once for this loop on its own
    pool (the waits around it are bounded by STEP_TIMEOUT)."""
    RawAsync.client = client = await run.topology.raw_async(tasks)
    try:
        yield client
    finally:
        RawAsync.client = None
        await run.topology.close_async(client)


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


AsyncOp = Callable[[], Awaitable[Any]]


async def burst(op: AsyncOp, tasks: int, total: int, seconds: float) -> int:
    """``total`` awaits of ``op``, by up to ``tasks`` tasks, until ``seconds`` have passed:
    the number made."""
    left, deadline = total, time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            await op()

    workers = (worker() for _ in range(min(tasks, total)))
    await asyncio.wait_for(asyncio.gather(*workers), STEP_TIMEOUT)
    return total - left


async def _measure_async(run: Run, backend: Backend, scenario: Scenario, n: int) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        if backend.alias is None:
            await stack.enter_async_context(raw_async_client(run, scenario.tasks))
        op = async_op(run, backend, scenario.name)
        warm = async_op(run, backend, "async.get")
        # Warm-up: one cheap read per task opens the pool's connections (and Django's
        # executor thread), then a few of the measured operation.
        warming = (warm() for _ in range(scenario.tasks))
        await asyncio.wait_for(asyncio.gather(*warming), STEP_TIMEOUT)
        await burst(op, scenario.tasks, min(n, 5), run.args.cap / 4)
        ports = run.data_ports()
        traffic = socket_traffic(ports)  # outside the timing, as the look after it
        gc.collect()
        start = time.perf_counter()
        done = await burst(op, scenario.tasks, n, run.args.cap)
        result = rate(done, n, time.perf_counter() - start)
        result["connections_used"] = connections_used(traffic, socket_traffic(ports))
        return result


def measure_async(run: Run, backend: Backend, scenario: Scenario, n: int) -> dict[str, Any]:
    """The measurement on a new event loop, with the connections its burst used and those
    the server received meanwhile (its warm-up opens them; a pool kept from an earlier loop
    opens none)."""
    received = connections_received(run)
    result = asyncio.run(_measure_async(run, backend, scenario, n))
    after = connections_received(run)
    result["connections_opened"] = None if received is None else after - received
    return result


def connections_received(run: Run) -> Any:
    """The server's count of connections received so far; None without a monitor."""
    if run.monitor is None:
        return None
    return run.monitor.info("stats")["total_connections_received"]


async def asgi_requests(app: ASGIHandler, url_path: str, n: int, concurrency: int) -> int:
    """Serve ``n`` GET requests of ``url_path`` through the ASGI app; how many were not 200."""
    failed = 0
    remaining = iter(range(n))

    async def worker() -> None:
        nonlocal failed
        for _ in remaining:
            status, _body = await asgi_get(app, url_path)
            failed += status != 200

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

    ports = run.topology.data_ports()

    async def serve() -> tuple[float, int, int | None]:
        async with contextlib.AsyncExitStack() as stack:
            if backend.alias is None:
                await stack.enter_async_context(raw_async_client(run))
            await asgi_requests(app, url_path, warmup, run.args.concurrency)
            traffic = socket_traffic(ports)
            gc.collect()
            start = time.perf_counter()
            failed = await asgi_requests(app, url_path, n, run.args.concurrency)
            elapsed = time.perf_counter() - start
            return n / elapsed, failed, connections_used(traffic, socket_traffic(ports))

    assert run.monitor is not None
    reset_sync_pool(run, backend)
    gc.collect()
    received_before = run.monitor.info("stats")["total_connections_received"]
    baseline = sampler.begin()
    try:
        # A fresh context, as a server's: request tasks must not inherit cache objects that
        # this process created outside requests (asgiref's Local is context-local).
        rps, failed, used = contextvars.Context().run(asyncio.run, serve())
    finally:
        peak, samples = sampler.end()
    received = run.monitor.info("stats")["total_connections_received"] - received_before
    return {
        "ops_per_s": rps,
        "failed_requests": failed,
        "connections_received": received,
        "connections_used": used,
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
    n = max(1, round(work(scenario, args) * run.share))
    backends = [backend for backend in run.backends if backend.runs(scenario.name)]
    failed: set[str] = set()
    started = time.monotonic()
    reps = args.asgi_reps if scenario.kind == "asgi" else args.reps
    tag = f"[{run.section} {scenario.name}]" if run.section else f"[{scenario.name}]"
    print(
        f"{tag} {scenario.title}: {n} {scenario.unit} x {reps} reps x {len(backends)} backends",
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
    labels = {backend.key: backend.label for backend in backends}
    cells = "  ".join(
        f"{labels[k]} {v['ops_per_s']:,.0f}/s {v['ratio']:.2f}x"
        for k, v in summary.items()
        if v.get("ratio") is not None
    )
    print(
        f"{tag} done in {time.monotonic() - started:.1f} s: {cells}",
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
        ratios = paired_ratio(run, scenario, backend, run.reference)
        entry: dict[str, Any] = {
            "ops_per_s": statistics.median(r["ops_per_s"] for r in reps),
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_reps": ratios,
            "reps": reps,
        }
        for figure in ("connections_used", "connections_opened"):
            counts = [r[figure] for r in reps if r.get(figure) is not None]
            if counts:
                entry[figure] = max(counts)
        if scenario.startswith("asgi."):
            entry["connections_received"] = max(r["connections_received"] for r in reps)
            entry["peak_clients"] = max(r["peak_clients"] for r in reps)
            entry["failed_requests"] = sum(r["failed_requests"] for r in reps)
        out[backend] = entry
    return out


def probe(run: Run) -> None:
    """Create each cache and write through it once: a backend that fails is left out of
    ``run``, as an error, or as skipped if its OPTIONS are a variant this version rejects."""
    for backend in run.backends:
        if backend.alias is not None:
            try:
                caches[backend.alias].set("probe", 1)  # creating it checks its OPTIONS
            except Exception as exc:
                if backend.optional and isinstance(exc, ImproperlyConfigured):
                    options = settings.CACHES[backend.alias].get("OPTIONS", {})
                    run.skip(backend, f"OPTIONS {options} rejected: {exc}")
                else:
                    run.error(backend, "setup", exc)
    run.backends = [b for b in run.backends if b.key not in run.failed]


def codec_section(
    main: Run, backends: list[Backend], scenarios: list[Scenario], app: ASGIHandler
) -> tuple[Run, Results, dict[str, int]]:
    """RedisEXCache's serializers and compressors on CODEC_VALUE, against plain pickle: the
    run, its results and the bytes each variant stores for the value."""
    run = Run(main.topology, main.prefix, main.args, backends, main.raw_sync, main.monitor)
    run.section, run.value, run.reference, run.share = "codecs", CODEC_VALUE, PLAIN, CODEC_SHARE
    run.errors = main.errors
    probe(run)
    for scenario in scenarios:
        run_scenario(run, scenario, app, None)
    assert main.monitor is not None
    stored = {
        b.key: int(main.monitor.strlen(caches[str(b.alias)].make_key("hit"))) for b in run.backends
    }
    return run, {s.name: summarize_scenario(run, s.name) for s in scenarios}, stored


def topology_section(
    name: str,
    main_args: argparse.Namespace,
    prefix: str,
    scenarios: list[Scenario],
    errors: dict[str, dict[str, str]],
    single: str | None = None,
) -> tuple[Run, Results, dict[str, Any]] | None:
    """Start topology ``name``, measure ``scenarios`` there, stop it: the run, its results
    and what was measured; None if it could not be started. Given ``single`` (the single
    server's URL: --cluster-goals), the Cluster section has both classes on it as rows."""
    began = time.monotonic()
    print(f"[{name}] starting its servers", file=sys.stderr, flush=True)
    try:
        topology = start_topology(name)  # a failed start stops what it started
    except Exception as exc:
        errors.setdefault(name, {})["setup"] = f"{type(exc).__name__}: {exc}"
        print(f"  ! {name} setup: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None
    try:
        setup = time.monotonic() - began
        single = single if name == "cluster" else None
        backends, entries, missing = topology_backends(topology, prefix, single)
        run = Run(topology, prefix, main_args, backends, topology.raw_sync(), section=name)
        run.errors = errors
        if single is not None:
            run.other_ports = Topology(single, []).data_ports()
        run.columns = backends + list(missing)
        for backend, reason in missing.items():
            run.skip(backend, reason)
        try:
            with override_settings(CACHES={**settings.CACHES, **entries}):
                try:
                    probe(run)
                    for scenario in scenarios:
                        run_scenario(run, scenario, ASGIHandler(), None)
                finally:
                    close_backends(entries)  # before its servers stop, as at the end
                    close_client_caches()
        finally:
            topology.close_sync(run.raw_sync)
        cpus = None
        if hasattr(os, "sched_getaffinity"):
            cpus = sorted({cpu for pid in topology.pids() for cpu in os.sched_getaffinity(pid)})
        info = {
            "servers": topology.describe(),
            "redis_processes": len(topology.pids()),
            "their_cpus": cpus,
            "setup_seconds": round(setup, 1),
            "seconds": round(time.monotonic() - began, 1),
            "skipped": run.skipped,
        }
    finally:
        topology.stop()
    return run, {s.name: summarize_scenario(run, s.name) for s in scenarios}, info


def topology_note(name: str, info: dict[str, Any], cpus: tuple[int, int | None] | None) -> str:
    where = "not pinned (--pin off)"
    if cpus is not None:
        where = f"on CPUs {info['their_cpus']}, this process on CPU {cpus[0]}"
        if info["their_cpus"] == [cpus[0]]:
            where = f"all pinned to CPU {cpus[0]} with this process"
    measured = info["seconds"] - info["setup_seconds"]
    skipped = "".join(
        f"\n    not measured: {why['label']}: {why['reason']}" for why in info["skipped"].values()
    )
    return (
        f"  {name}: {info['servers']};\n    {info['redis_processes']} redis processes {where}; "
        f"set up in {info['setup_seconds']:.1f} s, measured in {measured:.1f} s{skipped}"
    )


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


Results = dict[str, dict[str, dict[str, Any]]]  # scenario: backend key: figures


def cells(run: Run, entries: dict[str, dict[str, Any]], width: int, keys: Any = None) -> str:
    """One table row's cells: ops/s and ratio of each backend of ``run`` (or of ``keys``)."""
    out = []
    for key in keys or [backend.key for backend in run.backends]:
        entry = entries.get(key)
        if entry is None:
            why = "skipped" if key in run.skipped else "error" if key in run.failed else "-"
            out.append(f"{why:>{width}}")
            continue
        ratio = entry["ratio"]
        text = f"{entry['ops_per_s']:,.0f} {'' if ratio is None else f'{ratio:.2f}x'}"
        out.append(f"{text:>{width}}")
    return "".join(out)


def legend(run: Run) -> list[str]:
    """What each column heading of the main table stands for."""
    width = max(len(b.heading) for b in run.backends) + 2
    lines = ["columns:"]
    for backend in run.backends:
        text = "raw redis-py: redis.Redis / redis.asyncio.Redis" if backend.key == RAW else ""
        if backend.alias is not None:
            options = OPTIONS_OF.get(backend.key, {})
            text = backend.label + (f", OPTIONS {options}" if options else "")
        if backend.only:
            text += f" (only {', '.join(p.rstrip('.') for p in backend.only)})"
        lines.append(f"  {backend.heading:<{width}}{text}")
    return lines


def count(value: Any) -> str:
    return "?" if value is None else str(value)


def table(run: Run, results: Results) -> str:
    headings = [b.heading for b in run.backends]
    width = max(16, *(len(heading) + 2 for heading in headings))
    lines = [
        "ops/s (median) and ratio to the raw client of the same kind (median of per-rep ratios);",
        "'-': not run for that column",
        *legend(run),
        f"{'scenario':<16}{'work':<24}" + "".join(f"{h:>{width}}" for h in headings),
    ]
    for scenario in SCENARIOS:
        if scenario.name in results:
            row = cells(run, results[scenario.name], width)
            lines.append(f"{scenario.name:<16}{scenario.title:<24}{row}")
    concurrent = [s for s in SCENARIOS if s.kind == "async" and s.name in results]
    if concurrent:
        lines += [
            "",
            "async: connections used / opened (max over reps). Used: this process's connections "
            "to Redis that carried",
            "traffic during the measured burst (the kernel's byte counts, TCP_INFO). Opened: "
            "connections the server received",
            "during warm-up and burst (a pool kept from an earlier event loop opens none).",
            f"{'scenario':<16}{'work':<24}" + "".join(f"{h:>{width}}" for h in headings),
        ]
        for scenario in concurrent:
            row = ""
            for backend in run.backends:
                entry = results[scenario.name].get(backend.key)
                text = "-"
                if entry is not None:
                    used, opened = entry.get("connections_used"), entry.get("connections_opened")
                    text = f"{count(used)}/{count(opened)}"
                row += f"{text:>{width}}"
            lines.append(f"{scenario.name:<16}{scenario.title:<24}{row}")
    asgi = [s for s in SCENARIOS if s.kind == "asgi" and s.name in results]
    if asgi:
        requests = work(asgi[0], run.args)
        lines += [
            "",
            f"ASGI, {requests} requests at concurrency {run.args.concurrency}: opened: "
            "connections the server received (max over reps);",
            "used: connections that carried traffic during the measured requests (max); peak: "
            "connected clients above the",
            "baseline (max); failed: non-200 responses",
        ]
        width = max(len(b.label) for b in run.backends) + 2
        lines.append(f"{'scenario':<16}{'backend':<{width}}{'req/s':>10}{'ratio':>8}")
        lines[-1] += f"{'opened':>8}{'used':>8}{'peak':>8}{'failed':>8}"
        for scenario in asgi:
            for backend in run.backends:
                entry = results[scenario.name].get(backend.key)
                if entry is None:
                    continue
                ratio = "" if entry["ratio"] is None else f"{entry['ratio']:.2f}"
                lines.append(
                    f"{scenario.name:<16}{backend.label:<{width}}{entry['ops_per_s']:>10,.0f}"
                    f"{ratio:>8}{entry['connections_received']:>8}"
                    f"{count(entry.get('connections_used')):>8}{entry['peak_clients']:>8}"
                    f"{entry['failed_requests']:>8}"
                )
    return "\n".join(lines)


def table_notes(run: Run, measured: list[Backend]) -> list[str]:
    """What was not measured and why, and how django-vcache differs; ``measured`` are the
    backends that took part."""
    lines = []
    for why in run.skipped.values():
        lines.append(f"not measured: {why['label']}: {why['reason']}")
    for key, label in run.labels.items():
        for where, message in run.errors.get(key, {}).items():
            lines.append(f"failed: {label} ({where}): {message}")
    if any(backend.key.startswith(VCACHE) for backend in measured):
        lines += VCACHE_NOTE
    return lines


def codec_table(run: Run, results: Results, stored: dict[str, int]) -> str:
    labels = [b.label for b in run.backends]
    width = max(14, *(len(label) + 2 for label in labels))
    pickled = len(pickle.dumps(CODEC_VALUE, pickle.HIGHEST_PROTOCOL))
    sizes = "".join(f"{stored.get(b.key, 0):>{width},}" for b in run.backends)
    lines = [
        f"codec cost: RedisEXCache on a {pickled:,}-byte value (pickled), {CODEC_SHARE:.0%} of "
        "the work of each scenario; ops/s (median) and ratio to",
        "plain RedisEXCache (pickle, no compression), median of per-rep ratios, interleaved",
        f"{'scenario':<16}" + "".join(f"{label:>{width}}" for label in labels),
        f"{'bytes stored':<16}{sizes}",
    ]
    for scenario in SCENARIOS:
        if scenario.name in results:
            lines.append(f"{scenario.name:<16}{cells(run, results[scenario.name], width)}")
    return "\n".join(lines)


def topology_table(sections: list[tuple[Run, Results]], notes: list[str]) -> str:
    """Each scenario on every topology measured, with both classes and the raw clients, and
    the other rows of the sections other than the single server's (on Cluster: CLUSTER_ROWS,
    with --cluster-goals both classes on the single server), under their short headings; a
    single-server row shows its own figures for those it has too."""
    columns = [RAW, EX, AEX]
    width = max(20, *(len(LABELS[key]) + 2 for key in columns))
    headings = {key: LABELS[key] for key in columns}
    extra = []
    for run, _results in sections:
        if run.topology.name != "single":
            for backend in run.columns:
                if backend.key not in headings:
                    headings[backend.key] = backend.heading
                    extra.append(f"    {backend.heading}: {backend.label}")
    widths = [width if key in columns else max(16, len(h) + 2) for key, h in headings.items()]
    lines = [
        "topologies: ops/s (median) and ratio to the raw client of the same topology and kind",
        *notes,
        *(["  other columns:", *extra] if extra else []),
        f"{'scenario':<16}{'topology':<10}"
        + "".join(f"{h:>{w}}" for h, w in zip(headings.values(), widths, strict=True)),
    ]
    for scenario in SCENARIOS:
        first = scenario.name
        for run, results in sections:
            if scenario.name not in results:
                continue
            entries = results[scenario.name]
            row = "".join(
                cells(run, entries, w, [key]) for key, w in zip(headings, widths, strict=True)
            )
            lines.append(f"{first:<16}{run.topology.name:<10}{row}")
            first = ""
    return "\n".join(lines)


def goal_ratio(run: Run, goal: Goal, column: int) -> tuple[str, float | None, list[float]]:
    """One cell of the --cluster-goals table: its text, the median ratio and the per-rep
    ratios (none if either row was not measured)."""
    mine, theirs = goal.mine[column], goal.theirs[column]
    ratios = paired_ratio(run, goal.scenario, mine, theirs)
    if ratios:
        ratio = statistics.median(ratios)
        return f"{ratio:.2f}x", ratio, ratios
    for key in (mine, theirs):
        if key in run.skipped:
            return "skipped", None, []
        if key in run.failed:
            return "error", None, []
    return "-", None, []


def goals_table(run: Run, cpus: tuple[int, int | None] | None) -> tuple[str, list[Any]]:
    """What issue 20's "Done when" compares, from the Cluster section ``run`` (every row
    interleaved in it, the single server's too): the table and its figures for --json."""
    pinned = "not pinned"
    if cpus is not None:
        pinned = f"this process on CPU {cpus[0]}, " + (
            f"the servers on CPU {_server_cpu}" if _server_cpu is not None else "the servers too"
        )
    lines = [
        f"issue 20 on the 3-primary Cluster: median of per-rep ratios (of {run.args.reps}), "
        "every row interleaved in the Cluster section;",
        f"{pinned}. 'asks': issue 20's target (at least); 'met': the columns that reach it.",
        "EX+cc, AEX+cc in the client_cache line; vcache: django-vcache in CLUSTER_MODE; raw: "
        "redis-py's RedisCluster",
        f"{'':<40}{'EX':>10}{'AEX':>10}{'asks':>9}  met",
    ]
    figures = []
    for goal in GOALS:
        texts, met, measured = [], [], False
        entry: dict[str, Any] = {"scenario": goal.scenario, "what": goal.what}
        entry["target"] = goal.target
        for column, name in enumerate(("EX", "AEX")):
            text, ratio, ratios = goal_ratio(run, goal, column)
            texts.append(text)
            entry[name] = {"of": goal.mine[column], "to": goal.theirs[column], "ratio": ratio}
            entry[name]["ratio_reps"] = ratios
            measured = measured or ratio is not None
            if goal.target is not None and ratio is not None and ratio >= goal.target:
                met.append(name)
        asks = "" if goal.target is None else f">={goal.target:.1f}x"
        verdict = "" if goal.target is None else ", ".join(met) or ("no" if measured else "-")
        line = f"{goal.what:<40}{texts[0]:>10}{texts[1]:>10}{asks:>9}  {verdict}"
        lines.append(line.rstrip())
        figures.append(entry)
    return "\n".join(lines), figures


def meta(
    args: argparse.Namespace,
    prefix: str,
    started: float,
    cpus: tuple[int, int | None] | None,
    run: Run | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """How the numbers were made; ``run`` is the main table's (None without --topology single)."""
    ex = importlib.import_module("django_redis_ex")
    monitor = None if run is None else run.monitor
    server = {} if monitor is None else monitor.info("server")
    return {
        "argv": sys.argv[1:],
        "location": None if run is None else redact(run.url),
        "throwaway_server": args.location is None,
        "key_prefix": prefix,
        "reps": args.reps,
        "asgi_reps": args.asgi_reps,
        "cap_seconds": args.cap,
        "scale": args.scale,
        "quick": args.quick,
        "work": {s.name: work(s, args) for s in SCENARIOS},
        "asgi_concurrency": args.concurrency,
        "pinned": None
        if cpus is None
        else {
            "mode": args.pin,
            "this_process": cpus[0],
            "servers": cpus[0] if _server_cpu is None else _server_cpu,
            "sampler": cpus[1],
        },
        "backends": {} if run is None else {b.key: b.label for b in run.backends},
        "backend_options": {}
        if run is None
        else {b.key: OPTIONS_OF.get(b.key, {}) for b in run.backends},
        "connections_used": "TCP connections of this process to the server with traffic "
        "(TCP_INFO bytes acked or received) between a look before the measured burst or "
        "requests and one after",
        "raw_clients": {
            "single": "redis.Redis / redis.asyncio.Redis.from_url(url)",
            "sentinel": "redis.Redis / redis.asyncio.Redis on a SentinelConnectionPool "
            "(is_master=True)",
            "cluster": "redis.cluster.RedisCluster / redis.asyncio.cluster.RedisCluster; "
            "get_many: mget_nonatomic",
            "options": "redis-py's defaults",
            f"async.get_{WIDE_TASKS}": f"redis.asyncio.Redis on a BlockingConnectionPool of "
            f"{RAW_POOL} (the default pool refuses more than {RAW_POOL} connections)",
        },
        **extra,
        "python": platform.python_version(),
        "django": django.get_version(),
        "redis_py": redis.__version__,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "django_redis_ex": getattr(ex, "__version__", None),
        "django_vcache": package_version("django-vcache"),
        "redis_server": server.get("redis_version"),
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1),
    }


def environment(started: float) -> dict[str, Any]:
    """What a benchmark's JSON notes of where it ran (the other scripts' "meta" share it):
    versions, the module's hash, the machine's load at the end, the run's length."""
    module = importlib.import_module("django_redis_ex")
    return {
        "python": platform.python_version(),
        "django": django.get_version(),
        "redis_py": redis.__version__,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "module_sha256": hashlib.sha256(Path(module.__file__ or "").read_bytes()).hexdigest(),
        "cpu_count": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "seconds": round(time.monotonic() - started, 1),
    }


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Notes:
    """What a scenario script failed to measure (errors) and left out (skipped), by where:
    each printed to stderr as it happens, listed after the tables, and kept for the JSON."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def error(self, where: str, exc: BaseException) -> None:
        self.errors[where] = f"{type(exc).__name__}: {exc}"
        print(f"  ! {where}: {self.errors[where]}", file=sys.stderr, flush=True)

    def skip(self, where: str, reason: str) -> None:
        self.skipped[where] = reason
        print(f"  - {where}: not measured: {reason}", file=sys.stderr, flush=True)

    def listed(self) -> None:
        for where, reason in self.skipped.items():
            print(f"not measured: {where}: {reason}")
        for where, message in self.errors.items():
            print(f"error: {where}: {message}")


def script_options(parser: argparse.ArgumentParser, pin: str, max_seconds: float) -> None:
    """The options ``run_script`` reads, with a script's defaults."""
    parser.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    parser.add_argument(
        "--pin", choices=("shared", "split", "off"), default=pin, help=f"as bench.py's ({pin})"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=max_seconds,
        help=f"abort the whole run after this long ({max_seconds:g} s)",
    )


def run_script(
    name: str,
    args: argparse.Namespace,
    notes: Notes,
    body: Callable[[tuple[int, int | None] | None], tuple[dict[str, Any], dict[str, Any]]],
) -> int:
    """A scenario script's run (stale.py, health.py, tags_pages.py): bounded by --max-seconds,
    pinned by --pin, its servers stopped however it ends. ``body(cpus)`` measures and prints
    its tables, and returns the JSON document and its own "meta" entries; the notes follow
    the tables, and the document is written to --json with the meta all scripts share."""
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(CLEANUP.stop_all)
    watchdog(args.max_seconds)
    cpus = pin(args.pin)  # before any server starts (they inherit the CPU: shared)
    try:
        document, meta = body(cpus)
        notes.listed()
        if args.json:
            pinned = None if cpus is None else {"mode": args.pin, "this_process": cpus[0]}
            document["meta"] = {
                "argv": sys.argv[1:],
                "args": dict(vars(args)),
                "pinned": pinned,
                **meta,
                **environment(started),
            }
            Path(args.json).write_text(json.dumps(document, indent=1, default=str) + "\n")
        progress(f"{name}: {time.monotonic() - started:.0f} s")
        return 0
    except KeyboardInterrupt:
        progress(f"{name}: interrupted")
        return 130
    finally:
        CLEANUP.stop_all()


def rotated(items: list[Any], rep: int) -> list[Any]:
    """``items`` rotated by ``rep``: each repetition runs the rows in another order."""
    shift = rep % len(items) if items else 0
    return items[shift:] + items[:shift]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        "--baseline",
        metavar="PATH",
        help="also measure our rows for this copy of django_redis_ex.py (as main:EX, ...)",
    )
    parser.add_argument(
        "--scenario", action="append", default=[], help="run only scenarios with this prefix"
    )
    parser.add_argument(
        "--codecs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the codec cost: JSON and compression against plain pickle (on)",
    )
    parser.add_argument(
        "--topology",
        action="append",
        help="single, sentinel, cluster: where to measure (comma-separated or repeated; "
        "default single)",
    )
    parser.add_argument(
        "--cluster-goals",
        action="store_true",
        help="issue 20's comparison in one run: get and aget on the 3-primary Cluster and the "
        "single server, with django-vcache (CLUSTER_MODE) and client_cache, and the table of "
        "its ratios; implies --topology single,cluster, --no-codecs and --pin split",
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    parser.add_argument(
        "--tags-pages",
        action="store_true",
        help="run issue 21's benchmark (benchmarks/tags_pages.py: tags and page caching) with "
        "the other arguments, which are its own, and exit",
    )
    parser.add_argument(
        "--stale",
        action="store_true",
        help="run the benchmark of get_or_set at expiry with and without stale_while_revalidate "
        "(benchmarks/stale.py) with the other arguments, which are its own, and exit",
    )
    parser.add_argument(
        "--health",
        action="store_true",
        help="run the benchmark of reading cache.stats() under load (benchmarks/health.py) "
        "with the other arguments, which are its own, and exit",
    )
    parser.add_argument(
        "--pin",
        choices=("shared", "split", "off"),
        help="shared: this process and the servers on one CPU (the default); split: the "
        "servers on the first CPU, this process on the second (--cluster-goals' default)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs (--pin off)")
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
    if args.cluster_goals:
        if args.topology or args.scenario or args.backend or args.baseline:
            parser.error("--cluster-goals chooses the topologies, scenarios and rows itself")
        args.topology, args.codecs = ["single,cluster"], False
    if args.no_pin and args.pin not in (None, "off"):
        parser.error("--no-pin and --pin shared/split contradict each other")
    args.pin = "off" if args.no_pin else args.pin or ("split" if args.cluster_goals else "shared")
    chosen = {name.strip() for value in args.topology or ["single"] for name in value.split(",")}
    if chosen - set(TOPOLOGIES) or not chosen:
        parser.error(f"--topology takes {', '.join(TOPOLOGIES)}")
    args.topology = [name for name in TOPOLOGIES if name in chosen]
    return args


def pin(mode: str) -> tuple[int, int | None] | None:
    """Pin this process to one CPU: this CPU and another's number (the sampler's). "shared":
    the first, and so the redis-servers it starts; "split": the second, and the servers are
    started on the first (``on_server_cpu``), as issue 20 measured. Split needs two CPUs:
    with one, it is shared."""
    global _server_cpu
    if mode == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    if mode == "split" and len(available) > 1:
        _server_cpu = available[0]
        os.sched_setaffinity(0, {available[1]})
        return available[1], available[0]
    if mode == "split":
        print("bench: --pin split needs two CPUs; shared instead", file=sys.stderr)
    os.sched_setaffinity(0, {available[0]})
    return available[0], (available[1] if len(available) > 1 else None)


def watchdog(seconds: float) -> None:
    """Bound the whole run: past ``seconds``, stop the servers and helpers and exit."""

    def abort() -> None:
        print(f"bench: aborted after {seconds:.0f} s (--max-seconds)", file=sys.stderr)
        try:
            # Bounded: the main thread may be stuck in a call. The objects closed are this
            # thread's, made here: ours and django-vcache's share the pools and stores.
            close_backends()
            close_client_caches()
        finally:
            CLEANUP.stop_all()
            os._exit(3)

    timer = threading.Timer(seconds, abort)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    global _run
    argv = sys.argv[1:] if argv is None else argv
    if "--tags-pages" in argv:  # issue 21's scenario, with its own arguments; then exit
        sys.modules.setdefault("bench", sys.modules[__name__])  # it imports this module
        from tags_pages import main as tags_pages

        return tags_pages([arg for arg in argv if arg != "--tags-pages"])
    if "--stale" in argv:  # get_or_set at expiry, stale_while_revalidate; then exit
        sys.modules.setdefault("bench", sys.modules[__name__])  # it imports this module
        from stale import main as stale

        return stale([arg for arg in argv if arg != "--stale"])
    if "--health" in argv:  # the cost of reading stats() under load; then exit
        sys.modules.setdefault("bench", sys.modules[__name__])  # it imports this module
        from health import main as health

        return health([arg for arg in argv if arg != "--health"])
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(CLEANUP.stop_all)
    watchdog(args.max_seconds)
    cpus = pin(args.pin)  # before starting redis-server, which inherits the CPU (shared)
    prefix = f"bench:{secrets.token_hex(4)}:"
    monitor = None
    errors: dict[str, dict[str, str]] = {}
    document: dict[str, Any] = {"results": {}, "errors": errors}
    extra: dict[str, Any] = {}
    run = None
    settings_in_force = contextlib.ExitStack()
    try:
        chosen = [
            s for s in SCENARIOS if not args.scenario or s.name.startswith(tuple(args.scenario))
        ]
        if args.cluster_goals:  # these two only: the prefix "async.get" would take more
            chosen = [s for s in SCENARIOS if s.name in GOALS_SCENARIOS]
        single = "single" in args.topology
        codec_scenarios = [s for s in chosen if s.name in CODEC_SCENARIOS and args.codecs]
        caches_setting: dict[str, Any] = {}
        if single:
            servers = []
            if args.location:
                url = args.location
                print(
                    f"Using {redact(url)}: this writes keys under '{prefix}*' and deletes them "
                    "at the end (SCAN + DEL; never FLUSHDB). That server is not pinned.",
                    file=sys.stderr,
                )
            else:
                servers = [start_redis()]
                url = f"{servers[0].url}/0"
            monitor = redis.Redis.from_url(url, socket_timeout=10)
            monitor.ping()
            baseline = baseline_rows(args.baseline) if args.baseline else []
            rows = ROWS + baseline + [Row(dotted, dotted, "", "", {}) for dotted in args.backend]
            if args.cluster_goals:  # the single server's figures, for context
                rows = [row for row in ROWS if row.key in (EX, AEX)]
            backends, failed, missing = main_backends(caches_setting, url, prefix, rows)
            variants = codec_backends(caches_setting, url, prefix) if codec_scenarios else []
        install_urlconf()
        settings_in_force.enter_context(
            override_settings(CACHES={**settings.CACHES, **caches_setting})
        )
        sections: list[tuple[Run, Results]] = []
        if single:
            topology = Topology(url, servers)  # raw_sync: redis-py's defaults, the limit
            run = _run = Run(topology, prefix, args, backends, topology.raw_sync(), monitor)
            run.errors = errors
            for dotted in failed:
                try:
                    import_string(dotted)
                except Exception as exc:
                    run.error(Backend(dotted, None), "import", exc)
            for backend, reason in missing.items():
                run.skip(backend, reason)
            probe(run)
            document["skipped"] = run.skipped
            app = ASGIHandler()
            sampler = None
            if any(s.kind == "asgi" for s in chosen):
                sampler = Sampler(url, None if cpus is None else cpus[1])
            for scenario in chosen:
                run_scenario(run, scenario, app, sampler)
            results = {s.name: summarize_scenario(run, s.name) for s in chosen}
            print(table(run, results))
            document["notes"] = table_notes(run, run.backends)
            if document["notes"]:
                print("\n".join(["", *document["notes"]]))
            document["results"] = results
            sections.append((run, results))
            if codec_scenarios:
                codecs, codec_results, stored = codec_section(run, variants, codec_scenarios, app)
                print("\n" + codec_table(codecs, codec_results, stored))
                document["codecs"] = {
                    "reference": PLAIN,
                    "options": {b.key: CODECS[b.key][0] for b in codecs.backends},
                    "stored_bytes": stored,
                    "share_of_work": CODEC_SHARE,
                    "results": codec_results,
                }
        others = [name for name in args.topology if name != "single"]
        if others:
            notes = [
                "  ASGI scenarios are not run here (Django's request handling, the same on any "
                "topology);",
                "  Django's RedisCache has no Sentinel or Cluster support, and the aget at "
                f"{WIDE_TASKS} tasks",
                "  and the variants' rows (multiplex, sign_values) are measured on the single "
                "server only; Cluster",
                "  has client_cache and django-vcache (CLUSTER_MODE) rows too.",
            ]
            document["topologies"] = {}
            goals = None
            for name in others:
                scenarios = [s for s in chosen if s.kind != "asgi" and s.tasks <= RAW_POOL]
                single_url = url if args.cluster_goals else None
                section = topology_section(name, args, prefix, scenarios, errors, single_url)
                if section is None:
                    continue
                topology_run, topology_results, info = section
                sections.append((topology_run, topology_results))
                document["topologies"][name] = topology_results
                extra.setdefault("topologies", {})[name] = info
                notes.append(topology_note(name, info, cpus))
                if args.cluster_goals and name == "cluster":
                    goals = topology_run
            print("\n" + topology_table(sections, notes))
            if goals is not None:
                text, document["cluster_goals"] = goals_table(goals, cpus)
                print("\n" + text)
        if args.json:
            document["meta"] = meta(args, prefix, started, cpus, run, extra)
            Path(args.json).write_text(json.dumps(document, indent=1, default=str) + "\n")
        print(f"bench: {time.monotonic() - started:.0f} s", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        try:
            # Every cache and client first, while its server runs; then the servers.
            close_backends()
            if run is not None:
                with contextlib.suppress(Exception):
                    run.topology.close_sync(run.raw_sync)
            settings_in_force.close()  # Django's close_caches() too, and the handler reset
            # The tracking threads end before the keys are deleted: a heartbeat writes the
            # store's marker key again when it finds it gone.
            close_client_caches()
            if monitor is not None:
                if args.location:
                    with contextlib.suppress(redis.RedisError):
                        deleted = cleanup_keys(monitor, prefix)
                        print(f"deleted {deleted} keys under '{prefix}*'", file=sys.stderr)
                monitor.close()
        finally:
            CLEANUP.stop_all()


if __name__ == "__main__":
    sys.exit(main())
