"""Issue 21's benchmark: tagged reads, tag invalidation and page caching, in one run.

Run from the repository root::

    python benchmarks/tags_pages.py                       # about 3 minutes
    python benchmarks/tags_pages.py --reps 3 --json tags.json
    python benchmarks/tags_pages.py --part reads --topology cluster
    python benchmarks/bench.py --tags-pages --reps 3      # the same, through bench.py

It reuses bench.py (imported: its Django settings, servers, pinning, watchdog and ASGI driver)
and follows its method: every measurement does a fixed amount of work, the rows of a scenario
are interleaved in each repetition (their order rotated), and each ratio is taken within one
repetition, between rows measured side by side, then the median over the repetitions is given
(next to the median ops/s). On these 2-core machines only such ratios mean anything.

1. Tagged reads (``--part reads``), on each ``--topology`` (default: single, sentinel and
   cluster, started on free loopback ports one after the other), for both classes: ``get`` in
   a loop, ``aget`` at 100 concurrent tasks and ``get_many`` of 100 keys. Rows: the plain cache
   (OPTIONS without ``tags``: the reference, 1.00x), a cache with OPTIONS ``{"tags": True}``
   reading an untagged entry, an entry written with 1 tag and one with 5 tags (for
   ``get_many``: 100 such entries, the same tags for all), and raw redis-py's GET / MGET (Cluster:
   ``mget_nonatomic``) as the limit, as a ratio to each class's plain row.
2. Invalidation (``--part invalidation``): ``invalidate_tags`` of 1, 10 and 100 tags on each
   topology, and on the single server of one tag with 1,000 and with 100,000 entries (written
   with ``set_many`` in chunks of 1,000 beforehand); a raw DEL of one key for reference. Each
   call is timed alone, its tags' tokens made again by one tagged write before it; the cases
   are interleaved call by call; per repetition the median of ``--calls`` calls, then the
   median over repetitions, and ratios to the 1-tag case paired by repetition. Then, once,
   ``delete_pattern`` over the 100,000 keys (SCAN + DEL, what django-redis users do instead).
3. Page caching (``--part pages``, single server): a page (2 KB) served through Django's
   ASGIHandler in-process (bench.py's driver, ``--concurrency`` requests at a time), behind
   ``django_redis_ex.cache_page`` and behind Django's ``cache_page``, with AsyncRedisEXCache,
   RedisEXCache and Django's RedisCache as the page cache; every request a hit (the page is
   stored first; a view run while measuring is counted as a miss). Rows: the async view on
   ASGI (``--requests``, default 600 a measurement), and a sync view through Django's
   WSGIHandler called in a loop (one thread; twice as many requests). Also ours
   with ``tags=["pages"]`` on a tags-enabled cache of our classes, and the view without any
   page cache (Django's request handling alone). Without ``django_redis_ex.cache_page`` (not
   written yet) those rows are skipped, with the reason.
4. Page caching across a network (in ``--part pages``): the async view's rows again, both
   decorators on the three backends (a second set of page caches), but every byte between
   the cache clients and the redis-server goes through a TCP proxy in a separate process
   (pinned as the servers are) that delays each chunk, in each direction, by ``--latency-ms``
   (default 0.5: about 1 ms a round trip; 0 leaves these rows out), in order per connection:
   a loopback round trip costs ~20 us, so there Django's ``cache_page``, whose sync cache
   calls block the event loop, cannot look slower than ours, which awaits them. The round
   trip through the proxy is measured (PING) and printed with the table; ``--latency-requests``
   per measurement (default 300; the view behind Django's decorator is slow there).

Every wait is bounded (``wait_for``, deadlines, ``--cap`` per measurement and ``--max-seconds``
for the run, past which the servers are stopped and the process exits); every server is
started by the test harness and stopped by PID. It prints tables; ``--json`` writes every
figure, per repetition too. No pass/fail targets: the exit status never depends on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import functools
import gc
import io
import secrets
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import bench  # configures Django (settings, the harness) before anything else of Django
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse
from django.test.utils import override_settings
from django.urls import clear_url_caches, path
from django.views.decorators.cache import cache_page as django_cache_page

import django_redis_ex
from test_django_redis_ex import CLEANUP

EX, AEX, DJANGO = bench.EX, bench.AEX, bench.DJANGO
CLASSES = {"EX": EX, "AEX": AEX}
VALUE = bench.VALUE  # 100 bytes, as bench.py
PAYLOAD = bench.PAYLOAD
TAGS5 = ["t-a", "t-b", "t-c", "t-d", "t-e"]
ENTRY_TAGS = {"untagged": [], "tag1": TAGS5[:1], "tag5": TAGS5}
READ_ROWS = {  # row key: label; "plain" is the reference
    "plain": "plain cache (no tags)",
    "untagged": "tags on, untagged entry",
    "tag1": "tags on, 1 tag",
    "tag5": "tags on, 5 tags",
    "raw": "raw redis-py",
}
READ_KEY = {"plain": "hit", "untagged": "hit", "tag1": "hit1", "tag5": "hit5"}
MANY = 100


@dataclass(frozen=True)
class ReadScenario:
    name: str
    title: str
    unit: str
    base: int  # work of one measurement in a default run
    tasks: int = 0  # concurrent tasks (async); 0: a sync loop


READ_SCENARIOS = [
    ReadScenario("get", "get (sync loop)", "ops", 2_000),
    ReadScenario("aget", f"aget, {bench.TASKS} tasks", "ops", 3_000, bench.TASKS),
    ReadScenario("get_many", f"get_many {MANY} (sync)", "calls", 250),
]
INVALIDATE_TAGS = {"1 tag": 1, "10 tags": 10, "100 tags": 100}
ENTRIES = {"1 tag, 1,000 entries": 1_000, "1 tag, 100,000 entries": 100_000}
RAW_DEL = "raw DEL of 1 key"
CHUNK = 1_000  # set_many chunk when writing a tag's entries
PAGE = b"<!doctype html><title>page</title>" + b"<p>cached fragment</p>" * 90  # ~2 KB
PAGE_TIMEOUT = 300
WSGI_SHARE = 2  # WSGI requests per ASGI request: one thread, about 3x as fast
DECORATORS = ("django", "ours", "ours+tags")  # "none": the view without a page cache
PAGE_BACKENDS = {"AEX": AEX, "EX": EX, "Django": DJANGO}


@dataclass
class Section:
    """What one topology's run measured."""

    name: str
    reps: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)

    def record(
        self,
        per_row: dict[str, list[dict[str, Any]]],
        row: str,
        where: str,
        rep: int,
        measure: Callable[[], dict[str, Any]],
    ) -> None:
        """One repetition of ``row``: ``measure()``'s result filed under it; an error noted,
        and the row dropped for the rest of the run."""
        if where in self.failed:
            return
        try:
            result = measure()
        except Exception as exc:
            note_error(where, exc)
            self.failed.add(where)
            per_row.pop(row, None)
            return
        result["rep"] = rep
        per_row.setdefault(row, []).append(result)


NOTES = bench.Notes()
ERRORS, SKIPPED, note_error, note_skip = NOTES.errors, NOTES.skipped, NOTES.error, NOTES.skip
VIEW_CALLS = [0]  # views run: a page served from the cache runs none
progress, rotated = bench.progress, bench.rotated


def work(base: int, args: argparse.Namespace) -> int:
    return max(1, round(base * float(args.scale)))


def median_ratio(mine: list[dict[str, Any]], ref: list[dict[str, Any]], figure: str) -> Any:
    """The per-repetition ratios of ``figure`` (paired by "rep") and their median."""
    theirs = {r["rep"]: r[figure] for r in ref}
    ratios = [r[figure] / theirs[r["rep"]] for r in mine if theirs.get(r["rep"])]
    return (statistics.median(ratios) if ratios else None), ratios


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def time_sync(op: Callable[[], Any], n: int, cap: float) -> dict[str, Any]:
    for _ in range(min(n, 20)):
        op()
    gc.collect()
    start = time.perf_counter()
    done = bench.run_ops(op, n, start + cap)
    return bench.rate(done, n, time.perf_counter() - start)


AsyncOp = bench.AsyncOp


async def _time_async(
    open_op: Callable[[contextlib.AsyncExitStack], Awaitable[AsyncOp]],
    n: int,
    tasks: int,
    cap: float,
) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        op = await open_op(stack)
        await bench.burst(op, tasks, tasks, cap)  # warm-up: opens ``tasks`` calls' connections
        gc.collect()
        start = time.perf_counter()
        done = await bench.burst(op, tasks, n, cap)
        return bench.rate(done, n, time.perf_counter() - start)


def time_async(
    open_op: Callable[[contextlib.AsyncExitStack], Awaitable[AsyncOp]],
    n: int,
    tasks: int,
    cap: float,
) -> dict[str, Any]:
    """The burst on a new event loop, as bench.py measures."""
    return asyncio.run(_time_async(open_op, n, tasks, cap))


# ---------------------------------------------------------------------------
# 1. Tagged reads
# ---------------------------------------------------------------------------


def read_entries(prefix: str, topology: bench.Topology) -> dict[str, Any]:
    """CACHES entries for one topology: each class plain and with tags."""
    location, options = topology.location()
    entries = {}
    for short, dotted in CLASSES.items():
        for kind, extra in (("plain", {}), ("tags", {"tags": True})):
            alias = f"{topology.name}-{short}-{kind}"
            key_prefix = f"{prefix}{alias}"
            entries[alias] = bench.cache_entry(dotted, location, key_prefix, {**options, **extra})
    return entries


def many_keys(row: str) -> list[str]:
    return [f"m-{row}:{i}" for i in range(MANY)]


def seed_reads(topology: bench.Topology, raw: Any, prefix: str) -> None:
    """The entries the rows read, written through each cache itself, then read back once."""
    pipe = raw.pipeline(transaction=False)
    pipe.set(f"{prefix}raw:hit", PAYLOAD)
    for key in many_keys("raw"):
        pipe.set(f"{prefix}raw:{key}", PAYLOAD)
    pipe.execute()
    for short in CLASSES:
        plain: Any = caches[f"{topology.name}-{short}-plain"]  # our classes: tags=, ...
        plain.set("hit", VALUE, None)
        plain.set_many(dict.fromkeys(many_keys("plain"), VALUE), None)
        tagged: Any = caches[f"{topology.name}-{short}-tags"]
        for row, tags in ENTRY_TAGS.items():
            tagged.set(READ_KEY[row], VALUE, None, tags=tags)
            tagged.set_many(dict.fromkeys(many_keys(row), VALUE), None, tags=tags)
        for row in ENTRY_TAGS:  # a tagged read that misses would measure nothing useful
            if tagged.get(READ_KEY[row]) != VALUE:
                raise RuntimeError(f"{short} tags cache: {READ_KEY[row]!r} does not read back")
            if len(tagged.get_many(many_keys(row))) != MANY:
                raise RuntimeError(f"{short} tags cache: get_many({row}) does not read back")


def read_op(topology: bench.Topology, raw: Any, prefix: str, scenario: str, row: str) -> Any:
    """The sync operation of a row ("raw" or "EX:plain", "AEX:tag5", ...)."""
    if row == "raw":
        if scenario == "get_many":
            keys = [f"{prefix}raw:{key}" for key in many_keys("raw")]
            method = getattr(raw, topology.multi_get)
            return lambda: method(keys)
        key = f"{prefix}raw:hit"
        return lambda: raw.get(key)
    short, variant = row.split(":")
    cache = caches[f"{topology.name}-{short}-{'plain' if variant == 'plain' else 'tags'}"]
    if scenario == "get_many":
        keys = many_keys(variant)
        return lambda: cache.get_many(keys)
    key = READ_KEY[variant]
    return lambda: cache.get(key)


def read_async_opener(
    topology: bench.Topology, prefix: str, row: str
) -> Callable[[contextlib.AsyncExitStack], Awaitable[AsyncOp]]:
    async def open_op(stack: contextlib.AsyncExitStack) -> AsyncOp:
        if row == "raw":
            client = await topology.raw_async()
            stack.push_async_callback(topology.close_async, client)
            key = f"{prefix}raw:hit"
            return lambda: client.get(key)
        short, variant = row.split(":")
        cache = caches[f"{topology.name}-{short}-{'plain' if variant == 'plain' else 'tags'}"]
        key = READ_KEY[variant]
        return lambda: cache.aget(key)

    return open_op


def run_reads(
    section: Section, topology: bench.Topology, raw: Any, prefix: str, args: argparse.Namespace
) -> None:
    rows = ["raw"] + [f"{short}:{variant}" for short in CLASSES for variant in READ_KEY]
    for scenario in READ_SCENARIOS:
        n = work(scenario.base, args)
        started = time.monotonic()
        progress(f"[{section.name} reads.{scenario.name}] {n} {scenario.unit} x {args.reps} reps")
        per_row = section.reps.setdefault(f"reads.{scenario.name}", {})
        for rep in range(args.reps):
            for row in rotated(rows, rep):
                where = f"{section.name} reads.{scenario.name} {row}"
                measure = functools.partial(
                    measure_read, topology, raw, prefix, scenario, row, n, args
                )
                section.record(per_row, row, where, rep, measure)
        progress(f"  done in {time.monotonic() - started:.1f} s")


def measure_read(
    topology: bench.Topology,
    raw: Any,
    prefix: str,
    scenario: ReadScenario,
    row: str,
    n: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One repetition of a read row: at ``scenario.tasks`` tasks, or on the sync path."""
    if scenario.tasks:
        opener = read_async_opener(topology, prefix, row)
        return time_async(opener, n, scenario.tasks, args.cap)
    return time_sync(read_op(topology, raw, prefix, scenario.name, row), n, args.cap)


def summarize_reads(section: Section) -> dict[str, Any]:
    """Per scenario and class: each row's median ops/s and median ratio to the class's plain
    row (raw: raw / plain)."""
    out: dict[str, Any] = {}
    for scenario in READ_SCENARIOS:
        per_row = section.reps.get(f"reads.{scenario.name}", {})
        table: dict[str, Any] = {}
        for short in CLASSES:
            reference = per_row.get(f"{short}:plain", [])
            for variant in READ_ROWS:
                row = "raw" if variant == "raw" else f"{short}:{variant}"
                reps = per_row.get(row)
                if not reps:
                    continue
                ratio, ratios = median_ratio(reps, reference, "ops_per_s")
                table[f"{short}:{variant}"] = {
                    "ops_per_s": statistics.median(r["ops_per_s"] for r in reps),
                    "ratio_to_plain": ratio,
                    "ratio_reps": ratios,
                    "reps": reps,
                }
        out[scenario.name] = table
    return out


def reads_table(name: str, describe: str, summary: dict[str, Any], reps: int) -> str:
    width = 20
    head = "".join(f"{bench.LABELS[dotted]:>{width}}" for dotted in CLASSES.values())
    lines = [
        f"Tagged reads, {name}: {describe}",
        f"ops/s (get_many: calls/s), median of {reps}; ratio to the same class's plain cache,",
        "median of per-rep ratios (raw: raw / plain)",
        f"{'':<30}{head}",
    ]
    for scenario in READ_SCENARIOS:
        lines.append(f"{scenario.title}")
        table = summary.get(scenario.name, {})
        for variant, label in READ_ROWS.items():
            if variant == "raw":
                label = "raw redis-py MGET" if scenario.name == "get_many" else "raw redis-py GET"
            out = []
            for short in CLASSES:
                entry = table.get(f"{short}:{variant}")
                if entry is None:
                    out.append(f"{'error':>{width}}")
                    continue
                ratio = entry["ratio_to_plain"]
                text = f"{entry['ops_per_s']:,.0f} {'-' if ratio is None else f'{ratio:.2f}x'}"
                out.append(f"{text:>{width}}")
            lines.append(f"  {label:<28}{''.join(out)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 2. Invalidation
# ---------------------------------------------------------------------------


def write_entries(cache: Any, name: str, count: int) -> float:
    """``count`` entries of tag ``name`` (set_many in chunks); the seconds it took."""
    start = time.perf_counter()
    for first in range(0, count, CHUNK):
        chunk = {f"{name}:{i}": b"x" * 10 for i in range(first, min(count, first + CHUNK))}
        cache.set_many(chunk, None, tags=[name])
    return time.perf_counter() - start


def run_invalidation(
    section: Section, topology: bench.Topology, raw: Any, prefix: str, args: argparse.Namespace
) -> dict[str, Any]:
    cache: Any = caches[f"{topology.name}-EX-tags"]
    cases: dict[str, list[str]] = {
        case: [f"inv{count}-{i}" for i in range(count)] for case, count in INVALIDATE_TAGS.items()
    }
    extra: dict[str, Any] = {}
    if topology.name == "single":
        for case, count in ENTRIES.items():
            tag = f"e{count}"
            seconds = write_entries(cache, tag, count)
            extra.setdefault("writing_seconds", {})[case] = round(seconds, 2)
            progress(
                f"[{section.name} invalidation] {count:,} entries of tag {tag!r} written in "
                f"{seconds:.1f} s"
            )
            cases[case] = [tag]
    raw_key = f"{prefix}raw:del"

    def call(case: str) -> float:
        if case == RAW_DEL:
            raw.set(raw_key, PAYLOAD)
            start = time.perf_counter()
            raw.delete(raw_key)
            return time.perf_counter() - start
        tags = cases[case]
        cache.set(written[case], 1, None, tags=tags)  # new tokens for the tags, untimed
        start = time.perf_counter()
        cache.invalidate_tags(*tags)
        return time.perf_counter() - start

    names = [*cases, RAW_DEL]
    written = {case: f"written-{i}" for i, case in enumerate(cases)}  # an entry of its tags
    for case in cases:  # once, untimed: the invalidation works
        cache.set(written[case], 1, None, tags=cases[case])
        cache.invalidate_tags(*cases[case])
        if cache.get(written[case]) is not None:
            raise RuntimeError(f"{case}: the entry is still there after invalidate_tags")
    progress(
        f"[{section.name} invalidation] {len(names)} cases x {args.calls} calls x {args.reps} reps"
    )
    per_case = section.reps.setdefault("invalidation", {})
    for rep in range(args.reps):
        times: dict[str, list[float]] = {case: [] for case in names}
        for i in range(args.calls):
            for case in rotated(names, rep + i):
                times[case].append(call(case))
        for case in names:
            calls = times[case]
            per_case.setdefault(case, []).append(
                {
                    "rep": rep,
                    "median_us": statistics.median(calls) * 1e6,
                    "calls_us": [round(t * 1e6, 1) for t in calls],
                }
            )
    if topology.name == "single":
        big = max(ENTRIES.values())
        before = raw.dbsize()
        start = time.perf_counter()
        deleted = cache.delete_pattern(f"e{big}:*")
        seconds = time.perf_counter() - start
        extra["delete_pattern"] = {
            "pattern": f"e{big}:*",
            "deleted": deleted,
            "seconds": seconds,
            "dbsize": before,
        }
        progress(
            f"[{section.name} invalidation] delete_pattern: {deleted:,} keys in "
            f"{seconds:.2f} s (of {before:,} keys)"
        )
    return extra


def summarize_invalidation(section: Section) -> dict[str, Any]:
    per_case = section.reps.get("invalidation", {})
    reference = per_case.get("1 tag", [])
    out = {}
    for case, reps in per_case.items():
        ratio, ratios = median_ratio(reps, reference, "median_us")
        out[case] = {
            "median_us": statistics.median(r["median_us"] for r in reps),
            "ratio_to_1_tag": ratio,
            "ratio_reps": ratios,
            "reps": reps,
        }
    return out


def invalidation_table(sections: list[tuple[str, dict[str, Any]]], calls: int, reps: int) -> str:
    width = 16
    names = [name for name, _ in sections]
    cases = [*INVALIDATE_TAGS, *ENTRIES, RAW_DEL]
    lines = [
        "Invalidation: invalidate_tags, microseconds per call (median of "
        f"{calls} calls per rep, median of {reps} reps);",
        "ratio to the 1-tag case, median of per-rep ratios",
        f"{'':<26}" + "".join(f"{name:>{width}}" for name in names),
    ]
    for case in cases:
        out = []
        for _name, summary in sections:
            entry = summary.get("cases", {}).get(case)
            if entry is None:
                out.append(f"{'-':>{width}}")
                continue
            ratio = entry["ratio_to_1_tag"]
            text = f"{entry['median_us']:,.0f} {'-' if ratio is None else f'{ratio:.2f}x'}"
            out.append(f"{text:>{width}}")
        lines.append(f"  {case:<24}{''.join(out)}")
    for name, summary in sections:
        pattern = summary.get("extra", {}).get("delete_pattern")
        if pattern:
            lines.append(
                f"  {name}: delete_pattern({pattern['pattern']!r}), once: "
                f"{pattern['deleted']:,} keys in {pattern['seconds'] * 1e3:,.0f} ms "
                f"(SCAN of {pattern['dbsize']:,} keys + DEL)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 3. Page caching
# ---------------------------------------------------------------------------


async def page_async(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    VIEW_CALLS[0] += 1
    return HttpResponse(PAGE)


def page_sync(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    VIEW_CALLS[0] += 1
    return HttpResponse(PAGE)


def page_aliases(prefix: str, url: str) -> dict[str, Any]:
    entries = {}
    for short, dotted in PAGE_BACKENDS.items():
        alias = f"page-{short}"
        entries[alias] = bench.cache_entry(dotted, url, f"{prefix}{alias}", {})
        if dotted != DJANGO:
            entries[f"{alias}-tags"] = bench.cache_entry(
                dotted, url, f"{prefix}{alias}-tags", {"tags": True}
            )
    return entries


def page_rows() -> list[tuple[str, str]]:
    """(decorator, backend short name) of each measured row; "none" has no backend."""
    ours = getattr(django_redis_ex, "cache_page", None)
    rows = [("none", "-")]
    for short, dotted in PAGE_BACKENDS.items():
        for decorator in DECORATORS:
            if decorator != "django" and ours is None:
                continue
            if decorator == "ours+tags" and dotted == DJANGO:
                continue  # Django's RedisCache has no tags
            rows.append((decorator, short))
    return rows


def decorate(view: Callable[..., Any], decorator: str, short: str) -> Callable[..., Any]:
    if decorator == "none":
        return view
    maker: Any = django_cache_page
    if decorator != "django":
        maker = getattr(django_redis_ex, "cache_page", None)  # a teammate's, maybe not in yet
    if decorator == "ours+tags":  # on a tags-enabled cache of the same class
        wrapped: Callable[..., Any] = maker(
            PAGE_TIMEOUT, cache=f"page-{short}-tags", tags=["pages"]
        )(view)
    else:
        wrapped = maker(PAGE_TIMEOUT, cache=f"page-{short}")(view)
    return wrapped


def install_page_urls(rows: list[tuple[str, str]]) -> None:
    """bench.py's URLconf, with a URL per (view kind, decorator, backend)."""
    bench.install_urlconf()
    urls = sys.modules[bench.URLCONF]
    for decorator, short in rows:
        for kind, view in (("async", page_async), ("sync", page_sync)):
            route = f"tp/{kind}/{decorator}/{short}/"
            urls.urlpatterns.append(path(route, decorate(view, decorator, short)))
    clear_url_caches()


def page_url(kind: str, decorator: str, short: str) -> str:
    return f"/tp/{kind}/{decorator}/{short}/"


def wsgi_get(app: WSGIHandler, url_path: str) -> int:
    """One GET through Django's WSGI handler, as a server calls it: the status."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": url_path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "localhost",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(line)
        return None

    response = app(environ, start_response)
    try:
        b"".join(response)
    finally:
        response.close()
    return int(status[0].split()[0])


def measure_page(
    kind: str, url_path: str, n: int, args: argparse.Namespace, apps: dict[str, Any]
) -> dict[str, Any]:
    warm = max(1, min(n // 10, args.concurrency))
    if kind == "sync":
        app = apps["wsgi"]
        for _ in range(warm):
            wsgi_get(app, url_path)
        calls = VIEW_CALLS[0]
        gc.collect()
        start = time.perf_counter()
        deadline = start + args.cap
        failed = done = 0
        while done < n and time.perf_counter() < deadline:
            failed += wsgi_get(app, url_path) != 200
            done += 1
        elapsed = time.perf_counter() - start
    else:

        async def serve() -> tuple[int, int, float]:
            await bench.asgi_requests(apps["asgi"], url_path, warm, args.concurrency)
            views = VIEW_CALLS[0]
            gc.collect()
            began = time.perf_counter()
            bad = await bench.asgi_requests(apps["asgi"], url_path, n, args.concurrency)
            return bad, views, time.perf_counter() - began

        # A fresh context, as a server's (bench.py's measure_asgi does the same).
        failed, calls, elapsed = contextvars.Context().run(asyncio.run, serve())
        done = n
    result = bench.rate(done, n, elapsed)
    result["failed_requests"] = failed
    result["view_runs"] = VIEW_CALLS[0] - calls  # 0: every request was a hit
    return result


_PROXY = """
import os, queue, socket, sys, threading, time
target, delay, limit = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
threading.stack_size(256 * 1024)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
print(listener.getsockname()[1], flush=True)
threading.Timer(limit, os._exit, (0,)).start()  # bounded even if never stopped

def direction(src, dst, done):
    chunks = queue.SimpleQueue()  # (due, bytes), in arrival order; b"": the end

    def read():
        data = b""
        try:
            while True:
                data = src.recv(65536)
                chunks.put((time.monotonic() + delay, data))
                if not data:
                    return
        except OSError:
            chunks.put((0.0, b""))

    def write():
        try:
            while True:
                due, data = chunks.get()
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        done()

    for target_ in (read, write):
        threading.Thread(target=target_, daemon=True).start()

def serve(client):
    try:
        upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock, left = threading.Lock(), [2]

    def done():
        with lock:
            left[0] -= 1
            if left[0]:
                return
        for sock in (client, upstream):
            sock.close()

    direction(client, upstream, done)
    direction(upstream, client, done)

while True:
    client, _ = listener.accept()
    serve(client)
"""


class LatencyProxy:
    """A TCP proxy in another process, on a free loopback port, in front of the redis-server
    on ``target``: it delays every chunk, in each direction, by ``delay_ms`` (a sleep in a
    writer thread per direction and connection; order kept). Started as the servers are
    (pinned with them), registered with the harness's cleanup and stopped by its PID."""

    def __init__(self, target: int, delay_ms: float, limit: float) -> None:
        argv = [sys.executable, "-c", _PROXY, str(target), str(delay_ms / 1e3), str(limit)]
        with bench.on_server_cpu():
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        CLEANUP.register(self)
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 30)[0]:
            self.stop()
            raise TimeoutError("the latency proxy does not answer")
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the latency proxy exited")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def proxied(url: str, port: int) -> str:
    """``url`` with its port replaced by the proxy's."""
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.hostname}:{port}").geturl()


def ping_us(url: str, count: int = 200) -> float:
    """The median round trip of a PING (sync redis-py) to ``url``, in microseconds."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        for _ in range(20):
            client.ping()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            client.ping()
            times.append(time.perf_counter() - start)
    finally:
        client.close()
    return statistics.median(times) * 1e6


LAT = "-lat"  # the backends' short names of the page caches behind the proxy end with it


def latency_aliases(prefix: str, url: str) -> dict[str, Any]:
    return {
        f"page-{short}{LAT}": bench.cache_entry(dotted, url, f"{prefix}page-{short}{LAT}", {})
        for short, dotted in PAGE_BACKENDS.items()
    }


def latency_rows() -> list[tuple[str, str]]:
    ours = getattr(django_redis_ex, "cache_page", None) is not None
    decorators = ("django", "ours") if ours else ("django",)
    return [(decorator, f"{short}{LAT}") for short in PAGE_BACKENDS for decorator in decorators]


def install_latency_urls(rows: list[tuple[str, str]]) -> None:
    """The async view behind each latency row (after install_page_urls)."""
    urls = sys.modules[bench.URLCONF]
    for decorator, short in rows:
        route = f"tp/async/{decorator}/{short}/"
        urls.urlpatterns.append(path(route, decorate(page_async, decorator, short)))
    clear_url_caches()


def run_pages_latency(section: Section, raw: Any, args: argparse.Namespace) -> None:
    """The async view's rows with the page caches behind the latency proxy; each also counts
    the connections the server received during it (warm-up included: INFO stats)."""
    rows = latency_rows()
    apps = {"asgi": ASGIHandler()}
    n = work(args.latency_requests, args)
    started = time.monotonic()
    progress(
        f"[pages.latency] ASGI through the proxy ({args.latency_ms} ms each way): {n} requests "
        f"x {args.reps} reps x {len(rows)} rows"
    )
    per_row = section.reps.setdefault("pages.latency", {})
    for rep in range(args.reps):
        for decorator, short in rotated(rows, rep):
            row = f"{decorator}:{short.removesuffix(LAT)}"
            url = page_url("async", decorator, short)

            def measure(url: str = url) -> dict[str, Any]:
                before = raw.info("stats")["total_connections_received"]
                result = measure_page("async", url, n, args, apps)
                opened = raw.info("stats")["total_connections_received"] - before
                return {**result, "connections_opened": opened}

            section.record(per_row, row, f"pages.latency {row}", rep, measure)
    progress(f"  done in {time.monotonic() - started:.1f} s")


def latency_table(
    summary: dict[str, Any], proxy: dict[str, Any], reps: int, requests: int, concurrency: int
) -> str:
    width = 15
    heads = ["Django's", "ours", "ours/Django", "opened D/ours"]
    lines = [
        f"Page caching across a network: async view on ASGI, cache hits ({requests} requests, "
        f"{concurrency} at a time),",
        f"  the page caches behind a TCP proxy adding {proxy['delay_ms']} ms each way "
        f"(PING round trip: {proxy['ping_us']:,.0f} us through it, "
        f"{proxy['direct_ping_us']:,.0f} us direct);",
        f"  requests/s, median of {reps} reps; ours/Django: median of per-rep ratios, same backend",
        f"{'':<32}" + "".join(f"{head:>{width}}" for head in heads),
    ]
    for short, dotted in PAGE_BACKENDS.items():
        ours = summary.get(f"ours:{short}")
        out = []
        for entry, figure, ratio in (
            (summary.get(f"django:{short}"), "requests_per_s", False),
            (ours, "requests_per_s", False),
            (ours, "ratio_to_django", True),
        ):
            if entry is None or entry.get(figure) is None:
                out.append(f"{'-':>{width}}")
                continue
            text = f"{entry[figure]:.2f}x" if ratio else f"{entry[figure]:,.0f}"
            if not ratio and entry.get("misses"):
                text += f" ({entry['misses']} misses)"
            if not ratio and entry.get("failed_requests"):
                text += f" ({entry['failed_requests']} failed)"
            out.append(f"{text:>{width}}")
        opened = [
            str(statistics.median(r.get("connections_opened", 0) for r in entry["reps"]))
            if entry
            else "-"
            for entry in (summary.get(f"django:{short}"), ours)
        ]
        out.append(f"{'/'.join(opened):>{width}}")
        lines.append(f"  {bench.LABELS[dotted]:<30}{''.join(out)}")
    lines.append(
        "  opened: connections the server received per measurement (median; warm-up included)"
    )
    return "\n".join(lines)


def run_pages(section: Section, args: argparse.Namespace) -> None:
    rows = page_rows()
    apps = {"asgi": ASGIHandler(), "wsgi": WSGIHandler()}
    for kind in ("async", "sync"):
        n = work(args.requests * (WSGI_SHARE if kind == "sync" else 1), args)
        started = time.monotonic()
        server = "ASGI" if kind == "async" else "WSGI"
        progress(f"[pages.{kind}] {server}: {n} requests x {args.reps} reps x {len(rows)} rows")
        per_row = section.reps.setdefault(f"pages.{kind}", {})
        for rep in range(args.reps):
            for decorator, short in rotated(rows, rep):
                row = f"{decorator}:{short}"
                url = page_url(kind, decorator, short)
                section.record(
                    per_row,
                    row,
                    f"pages.{kind} {row}",
                    rep,
                    functools.partial(measure_page, kind, url, n, args, apps),
                )
        progress(f"  done in {time.monotonic() - started:.1f} s")


def summarize_pages(section: Section) -> dict[str, Any]:
    """Per view kind and row: median requests/s, ratios paired by rep to Django's cache_page
    on the same backend ("ours", "ours+tags") and to ours ("ours+tags")."""
    out: dict[str, Any] = {}
    for kind in ("async", "sync", "latency"):
        per_row = section.reps.get(f"pages.{kind}", {})
        if kind == "latency" and not per_row:
            continue
        table = {}
        for row, reps in per_row.items():
            decorator, short = row.split(":")
            entry: dict[str, Any] = {
                "requests_per_s": statistics.median(r["ops_per_s"] for r in reps),
                "view_runs": sum(r["view_runs"] for r in reps),
                "misses": None if decorator == "none" else sum(r["view_runs"] for r in reps),
                "failed_requests": sum(r["failed_requests"] for r in reps),
                "reps": reps,
            }
            for name, reference in (("django", f"django:{short}"), ("ours", f"ours:{short}")):
                if reference != row and reference in per_row and decorator != "django":
                    ratio, ratios = median_ratio(reps, per_row[reference], "ops_per_s")
                    entry[f"ratio_to_{name}"], entry[f"ratio_to_{name}_reps"] = ratio, ratios
            table[row] = entry
        out[kind] = table
    return out


def pages_table(summary: dict[str, Any], reps: int, requests: int, concurrency: int) -> str:
    width = 15
    heads = ["Django's", "ours", "ours/Django", "ours+tags", "tags/ours"]
    lines = [
        "Page caching (cache hits): requests/s, median of "
        f"{reps} reps; ratios: median of per-rep ratios, same backend",
        f"  async view on ASGI ({requests} requests, {concurrency} at a time); sync view on WSGI "
        f"({requests * WSGI_SHARE} requests, one thread)",
        "  decorator: Django's cache_page / django_redis_ex.cache_page / the latter with "
        "tags=['pages'] (a tags cache)",
        f"{'':<32}" + "".join(f"{head:>{width}}" for head in heads),
    ]

    def cell(entry: dict[str, Any] | None, figure: str, ratio: bool = False) -> str:
        if entry is None or entry.get(figure) is None:
            return f"{'-':>{width}}"
        value = entry[figure]
        text = f"{value:.2f}x" if ratio else f"{value:,.0f}"
        if not ratio and entry.get("misses"):
            text += f" ({entry['misses']} misses)"
        if not ratio and entry.get("failed_requests"):
            text += f" ({entry['failed_requests']} failed)"
        return f"{text:>{width}}"

    for kind, title in (("async", "async view, ASGI"), ("sync", "sync view, WSGI")):
        table = summary.get(kind, {})
        lines.append(title)
        none = table.get("none:-")
        if none is not None:
            lines.append(f"  {'no page cache (view runs)':<30}{cell(none, 'requests_per_s')}")
        for short, dotted in PAGE_BACKENDS.items():
            ours, tagged = table.get(f"ours:{short}"), table.get(f"ours+tags:{short}")
            out = [
                cell(table.get(f"django:{short}"), "requests_per_s"),
                cell(ours, "requests_per_s"),
                cell(ours, "ratio_to_django", ratio=True),
                cell(tagged, "requests_per_s"),
                cell(tagged, "ratio_to_ours", ratio=True),
            ]
            lines.append(f"  {bench.LABELS[dotted]:<30}{''.join(out)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Driving the run
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (5)")
    parser.add_argument(
        "--part",
        action="append",
        help="reads, invalidation, pages (comma-separated or repeated; default all)",
    )
    parser.add_argument(
        "--topology",
        action="append",
        help="single, sentinel, cluster for reads and invalidation (default all; pages: "
        "single only)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply all work (smoke: 0.1)")
    parser.add_argument("--cap", type=float, default=2.0, help="seconds one measurement may run")
    parser.add_argument("--calls", type=int, default=15, help="invalidations per case per rep")
    parser.add_argument("--requests", type=int, default=600, help="page requests per measurement")
    parser.add_argument("--concurrency", type=int, default=50, help="ASGI concurrency (50)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.5,
        help="one-way delay of the proxy in front of Redis for the network page rows (0.5; "
        "0: no such rows)",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=300,
        help="page requests per measurement through the proxy (300)",
    )
    bench.script_options(parser, pin="shared", max_seconds=600)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.calls < 1 or args.scale <= 0 or args.requests < 1:
        parser.error("--reps, --calls, --requests and --scale must be positive")
    if args.latency_ms < 0 or args.latency_requests < 1:
        parser.error("--latency-ms must not be negative, --latency-requests must be positive")

    def chosen(values: list[str] | None, allowed: Iterable[str], option: str) -> list[str]:
        allowed = list(allowed)
        names = {n.strip() for value in values or [",".join(allowed)] for n in value.split(",")}
        if names - set(allowed) or not names:
            parser.error(f"{option} takes {', '.join(allowed)}")
        return [name for name in allowed if name in names]

    args.part = chosen(args.part, ("reads", "invalidation", "pages"), "--part")
    args.topology = chosen(args.topology, bench.TOPOLOGIES, "--topology")
    if "pages" in args.part and "single" not in args.topology:
        args.topology.insert(0, "single")
    return args


def run_topology(name: str, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    began = time.monotonic()
    progress(f"[{name}] starting its servers")
    if name == "single":
        server = bench.start_redis()
        topology = bench.Topology(f"{server.url}/0", [server])
    else:
        topology = bench.start_topology(name)
    section = Section(name)
    out: dict[str, Any] = {"servers": topology.describe()}
    proxy: LatencyProxy | None = None
    try:
        raw = topology.raw_sync()
        entries = read_entries(prefix, topology)
        wants_pages = name == "single" and "pages" in args.part
        if wants_pages:
            entries.update(page_aliases(prefix, topology.url))
            if args.latency_ms > 0:
                port = urlsplit(topology.url).port or 6379
                proxy = LatencyProxy(port, args.latency_ms, args.max_seconds + 60)
                proxy_url = proxied(topology.url, proxy.port)
                entries.update(latency_aliases(prefix, proxy_url))
                out["latency_proxy"] = {
                    "delay_ms": args.latency_ms,
                    "port": proxy.port,
                    "ping_us": ping_us(proxy_url),
                    "direct_ping_us": ping_us(topology.url),
                }
        try:
            with override_settings(CACHES={**settings.CACHES, **entries}):
                try:
                    if "reads" in args.part or "invalidation" in args.part:
                        seed_reads(topology, raw, prefix)
                    if "reads" in args.part:
                        run_reads(section, topology, raw, prefix, args)
                        out["reads"] = summarize_reads(section)
                        print(
                            "\n" + reads_table(name, topology.describe(), out["reads"], args.reps),
                            flush=True,
                        )
                    if "invalidation" in args.part:
                        try:
                            extra = run_invalidation(section, topology, raw, prefix, args)
                        except Exception as exc:
                            note_error(f"{name} invalidation", exc)
                        else:
                            out["invalidation"] = {
                                "cases": summarize_invalidation(section),
                                "extra": extra,
                            }
                    if wants_pages:
                        if getattr(django_redis_ex, "cache_page", None) is None:
                            note_skip(
                                "pages: django_redis_ex.cache_page",
                                "django_redis_ex has no cache_page yet; only Django's "
                                "cache_page rows are measured",
                            )
                        install_page_urls(page_rows())
                        run_pages(section, args)
                        if proxy is not None:
                            install_latency_urls(latency_rows())
                            run_pages_latency(section, raw, args)
                        out["pages"] = summarize_pages(section)
                finally:
                    bench.close_backends(entries)  # before the servers stop
                    bench.close_client_caches()
        finally:
            topology.close_sync(raw)
    finally:
        if proxy is not None:
            proxy.stop()
        topology.stop()
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return bench.run_script("tags_pages", args, NOTES, lambda cpus: report(args))


def report(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's tables printed; its JSON document and meta returned."""
    prefix = f"tp:{secrets.token_hex(4)}:"
    document: dict[str, Any] = {"topologies": {}, "errors": ERRORS, "skipped": SKIPPED}
    for name in args.topology:
        try:
            document["topologies"][name] = run_topology(name, args, prefix)
        except Exception as exc:
            note_error(f"{name}", exc)
    sections = [
        (name, result["invalidation"])
        for name, result in document["topologies"].items()
        if "invalidation" in result
    ]
    if sections:
        print("\n" + invalidation_table(sections, args.calls, args.reps))
    single = document["topologies"].get("single", {})
    pages = single.get("pages")
    if pages is not None:
        print("\n" + pages_table(pages, args.reps, work(args.requests, args), args.concurrency))
    if pages is not None and "latency" in pages and "latency_proxy" in single:
        requests = work(args.latency_requests, args)
        table = latency_table(
            pages["latency"], single["latency_proxy"], args.reps, requests, args.concurrency
        )
        print("\n" + table)
    meta = {
        "work": {s.name: work(s.base, args) for s in READ_SCENARIOS},
        "cache_page": getattr(django_redis_ex, "cache_page", None) is not None,
    }
    return document, meta


if __name__ == "__main__":
    sys.exit(main())
