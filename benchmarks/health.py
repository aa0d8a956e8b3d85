"""Reading ``cache.stats()`` under load: throughput with and without a reader, in one run.

Run from the repository root::

    python benchmarks/health.py                       # about 1 minute
    python benchmarks/health.py --reps 5 --json health.json
    python benchmarks/health.py --intervals 0.01,1 --seconds 8   # also a reader every second
    python benchmarks/bench.py --health --reps 3      # the same, through bench.py

The question (the issue: "reading ``stats()`` under load costs under 1% of throughput"):
``stats()`` includes ``"pools"`` (``_pools_report``: it walks the registry's pools, the live
event loops' pools, the multiplexed lines and the tracking store, without I/O), and a
metrics scraper may call it while the process serves. It reuses bench.py (imported: its
Django settings, server, pinning and watchdog) and follows its method: every row of a
repetition is measured side by side with the others (their order rotated from one repetition
to the next), each ratio is taken within one repetition, then the median over the
repetitions is given. On these 2-core machines only such ratios mean anything, and a 1%
difference only between measurements this close: within one row's measurement, the
throughput without the reader and with it are taken in alternating slices of ``--slice``
(0.1 s) of one run of the callers, off, on, on, off, ... (a drift of the machine's speed
weighs on both sides alike), the reader paused (waiting on an event, not polling) in the
slices without it.

Rows, per class (``RedisEXCache`` and ``AsyncRedisEXCache``), per configuration, and per
reader interval (``--intervals``: 0.01 s, far more often than a scraper's 10 to 15 s; each
interval a row, its slices at least that long):

- ``aget`` hits from ``--tasks`` (100) concurrent asyncio tasks on one loop for
  ``--seconds`` (2 s), the reader one more task of that loop calling ``cache.stats()`` and
  sleeping the interval after each call;
- ``get`` hits from ``--threads`` (8) threads, the reader a thread of its own.

The figures: operations per second without the reader and with it, their ratio (with /
without; 1.0 is no cost, 0.99 the issue's target) per repetition and its median; the
reader's calls, the median of their durations under that load (us), and its share: the time
spent in ``stats()`` over the slices with the reader, an estimate of the cost that the
noise of the throughputs does not blur (though not of what the callers then pay for the
caches that a call left cold).

Configurations: ``plain`` (one server, no OPTIONS) and ``big``, the largest report that one
server gives: OPTIONS ``{"client_cache": True}`` and LOCATION the server and ``--replicas``
(2) replicas of it. With client_cache the cache's own calls go to the first server (the one
tracked), and raw clients (``get_client``, ``get_async_client``) have pools of their own, one
per server; every warm-up PINGs them, so that the report lists, per context (sync, and each
live loop), the cache's pool and the raw clients' pool of each server, besides the
multiplexed line and the tracking connection. Its hits are answered from process memory
(ten times the rate of a round trip): the cost of a report weighs most there. Every async
caller yields to the loop after each chunk of ``bench.CHUNK`` (10) calls, in every row
alike: a hit from process memory never suspends, and the reader would never run.
``--replicas 0``: ``big`` is client_cache on the one server.

Then, per class and configuration, the cost of one ``stats()`` call: the median of
``--calls`` (1000) calls timed one by one, back to back with nothing else running, in an
event loop whose ``--tasks`` concurrent ``aget`` calls opened its pools ("in a loop": the
async path's report, every live loop's pools walked) and outside any loop after a ``get``
("sync": the loops closed), with the report's size (pools listed, JSON bytes); median of the
repetitions. Back to back, a call finds the CPU's caches warm: one call every 10 ms under
load costs several times as much (the reader's us/call).

Every wait is bounded (``wait_for``, thread joins and barriers, ``--cap`` past a measurement's
length, and ``--max-seconds`` for the run, past which the servers are stopped and the process
exits); the servers are started by the test harness (with ``--pin split``, the default as in
issue 20's figures, on the first CPU, this process on the second) and stopped by PID. It
prints a table; ``--json`` writes every figure, per repetition too. No pass/fail targets: the
exit status never depends on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import bench  # configures Django (settings, the harness) before anything else of Django
from django.conf import settings
from django.core.cache import caches
from django.test.utils import override_settings

from test_django_redis_ex import RedisServer, redact, replica_synced, wait_until

EX, AEX = bench.EX, bench.AEX
VALUE = bench.VALUE  # 100 bytes, as bench.py
SHORTS = {"EX": EX, "AEX": AEX}
CONFIGS = ("plain", "big")
KEY = "hit"


@dataclass(frozen=True)
class Row:
    key: str  # what results are filed under: "AEX:big:async:0.01"
    short: str  # the class: a key of SHORTS
    config: str  # "plain" or "big"
    kind: str  # "async" (aget from tasks) or "threads" (get from threads)
    interval: float  # seconds between two stats() calls of the reader

    @property
    def alias(self) -> str:
        return alias_of(self.short, self.config)

    @property
    def group(self) -> str:
        return f"{self.short}:{self.config}:{self.kind}"


def alias_of(short: str, config: str) -> str:
    return f"health-{short}-{config}"


def kinds(args: argparse.Namespace) -> list[tuple[str, str]]:
    out = [("async", f"aget, {args.tasks} tasks")]
    if args.threads:
        out.append(("threads", f"get, {args.threads} threads"))
    return out


def rows_of(args: argparse.Namespace) -> list[Row]:
    return [
        Row(f"{short}:{config}:{kind}:{interval:g}", short, config, kind, interval)
        for short in SHORTS
        for config in CONFIGS
        for kind, _ in kinds(args)
        for interval in args.intervals
    ]


NOTES = bench.Notes()  # errors only: every row is measured
ERRORS, note_error = NOTES.errors, NOTES.error
progress, rotated = bench.progress, bench.rotated


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


class Reader:
    """The reader's calls of ``stats()``: how long each took (ns)."""

    def __init__(self) -> None:
        self.durations: list[int] = []

    def call(self, cache: Any) -> None:
        began = time.perf_counter_ns()
        cache.stats()
        self.durations.append(time.perf_counter_ns() - began)


class Slices:
    """One measurement's alternation: slice ``index`` without the reader or with it (off, on,
    on, off, ...), and the operations and seconds of each side."""

    def __init__(self, row: Row, args: argparse.Namespace) -> None:
        self.length = max(args.slice, row.interval)
        self.count = max(2, round(args.seconds / self.length))
        self.ops = {False: 0, True: 0}
        self.seconds = {False: 0.0, True: 0.0}

    @staticmethod
    def reading(index: int) -> bool:
        return index % 4 in (1, 2)

    def add(self, reading: bool, ops: int, seconds: float) -> None:
        self.ops[reading] += ops
        self.seconds[reading] += seconds

    def figures(self, reader: Reader) -> dict[str, Any]:
        without = self.ops[False] / self.seconds[False]
        with_ = self.ops[True] / self.seconds[True]
        durations = reader.durations
        return {
            "without_ops_per_s": without,
            "with_ops_per_s": with_,
            "ratio": with_ / without if without else None,
            "ops": dict(self.ops),
            "seconds": dict(self.seconds),
            "slices": self.count,
            "slice_seconds": self.length,
            "reader_calls": len(durations),
            "reader_us": statistics.median(durations) / 1000 if durations else None,
            "reader_share": sum(durations) / 1e9 / self.seconds[True],
        }


WARM = itertools.count()  # the warm-up's keys: new ones each time, misses everywhere
RAW_READS = 20  # PINGs on raw clients for reads: each replica's pool made (1 - 2 * 2**-20)


async def warm_async(cache: Any, args: argparse.Namespace) -> None:
    """One read per task, each of a key never read before (client_cache has none of them),
    a write, a PING on raw clients (``get_async_client``; with client_cache, on pools of their
    own: the big configuration's report lists them) of each server, and a checked hit."""
    await asyncio.gather(*(cache.aget(f"warm:{next(WARM)}") for _ in range(args.tasks)))
    await cache.aset("warm", VALUE)
    await cache.get_async_client().ping()
    for _ in range(RAW_READS):  # a random replica each
        await cache.get_async_client(write=False).ping()
    if await cache.aget(KEY) != VALUE:
        raise RuntimeError(f"aget({KEY!r}) is not a hit")


def warm_sync(cache: Any, reads: int) -> None:
    """``warm_async``'s sync twin: ``reads`` misses, a write, the PINGs, a checked hit."""
    for _ in range(reads):
        cache.get(f"warm:{next(WARM)}")
    cache.set("warm", VALUE)
    cache.get_client().ping()
    for _ in range(RAW_READS):
        cache.get_client(write=False).ping()
    if cache.get(KEY) != VALUE:
        raise RuntimeError(f"get({KEY!r}) is not a hit")


async def _measure_async(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    cache: Any = caches[row.alias]
    await asyncio.wait_for(warm_async(cache, args), args.cap)
    reader, slices = Reader(), Slices(row, args)
    reading = asyncio.Event()
    done = 0
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            for _ in range(bench.CHUNK):
                await cache.aget(KEY)
            done += bench.CHUNK
            await asyncio.sleep(0)  # a hit from client_cache never suspends: the others' turn

    async def read() -> None:
        while True:
            await reading.wait()
            if stop:
                return
            reader.call(cache)
            await asyncio.sleep(row.interval)

    gc.collect()
    tasks = [asyncio.create_task(worker()) for _ in range(args.tasks)]
    tasks.append(asyncio.create_task(read()))
    try:
        await asyncio.sleep(args.slice)  # every caller under way; not counted
        for index in range(slices.count):
            on = slices.reading(index)
            if on:
                reading.set()
            else:
                reading.clear()
            began, before = time.perf_counter(), done
            await asyncio.sleep(slices.length)
            slices.add(on, done - before, time.perf_counter() - began)
    finally:
        stop = True
        reading.set()
        await asyncio.wait_for(asyncio.gather(*tasks), args.cap)
    return slices.figures(reader)


def measure_async(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """The measurement on a new event loop, as bench.py measures."""
    return asyncio.run(_measure_async(row, args))


def measure_threads(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    reader, slices = Reader(), Slices(row, args)
    reading, stop = threading.Event(), threading.Event()
    barrier = threading.Barrier(args.threads + 2)  # the callers, the reader, this thread
    failures: list[BaseException] = []
    done = [0] * args.threads

    def worker(index: int) -> None:
        try:
            cache: Any = caches[row.alias]  # this thread's cache object, as Django's
            warm_sync(cache, 1)
            barrier.wait(timeout=args.cap)
            while not stop.is_set():
                for _ in range(bench.CHUNK):
                    cache.get(KEY)
                done[index] += bench.CHUNK
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    def read() -> None:
        try:
            cache: Any = caches[row.alias]
            barrier.wait(timeout=args.cap)
            while reading.wait(args.seconds + args.cap) and not stop.is_set():
                reader.call(cache)
                stop.wait(row.interval)
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True, name=f"health: caller {i}")
        for i in range(args.threads)
    ]
    threads.append(threading.Thread(target=read, daemon=True, name="health: reader"))
    for thread in threads:
        thread.start()
    gc.collect()
    try:
        barrier.wait(timeout=args.cap)
        time.sleep(args.slice)  # every caller under way; not counted
        for index in range(slices.count):
            if failures:
                break
            on = slices.reading(index)
            if on:
                reading.set()
            else:
                reading.clear()
            began, before = time.perf_counter(), sum(done)
            time.sleep(slices.length)
            slices.add(on, sum(done) - before, time.perf_counter() - began)
    except threading.BrokenBarrierError:
        pass  # a failure, raised below
    finally:
        stop.set()
        reading.set()
        join_by = time.monotonic() + args.cap
        for thread in threads:
            thread.join(max(0.0, join_by - time.monotonic()))
    if failures:
        raise failures[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"threads still running {args.cap:.0f} s after the measurement")
    return slices.figures(reader)


def measure(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    if row.kind == "threads":
        return measure_threads(row, args)
    return measure_async(row, args)


def report_size(report: dict[str, Any]) -> dict[str, Any]:
    pools = report["pools"]
    listed = len(pools["sync"]) + sum(len(loop["pools"]) for loop in pools["async"])
    return {
        "pools_listed": listed,
        "lines": len(pools["lines"]),
        "tracking": pools["tracking"] is not None,
        "bytes": len(json.dumps(pools, default=str)),
    }


def timed_calls(cache: Any, calls: int) -> float:
    """The median duration of ``calls`` calls of ``stats()``, timed one by one (us)."""
    durations = []
    for _ in range(calls):
        began = time.perf_counter_ns()
        cache.stats()
        durations.append(time.perf_counter_ns() - began)
    return statistics.median(durations) / 1000


async def _cost_in_loop(alias: str, args: argparse.Namespace) -> dict[str, Any]:
    cache: Any = caches[alias]
    await asyncio.wait_for(warm_async(cache, args), args.cap)
    gc.collect()
    us = timed_calls(cache, args.calls)
    return {"us": us, **report_size(cache.stats())}


def cost(alias: str, args: argparse.Namespace) -> dict[str, Any]:
    """One stats() call, in a loop whose pools are open, then outside any loop (sync)."""
    in_loop = asyncio.run(_cost_in_loop(alias, args))
    cache: Any = caches[alias]
    warm_sync(cache, 10)
    gc.collect()
    us = timed_calls(cache, args.calls)
    outside = {"us": us, **report_size(cache.stats())}
    return {"in_loop": in_loop, "sync": outside}


# ---------------------------------------------------------------------------
# Summary and tables
# ---------------------------------------------------------------------------


def median_of(results: list[dict[str, Any]], name: str) -> float | None:
    values = [r[name] for r in results if r.get(name) is not None]
    return statistics.median(values) if values else None


def summarize(
    reps: dict[str, list[dict[str, Any]]],
    costs: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Per row: the median of each figure over the repetitions, the ratios of each
    repetition; per alias: one call's cost."""
    out: dict[str, Any] = {"rows": {}, "cost": {}}
    for row_key, results in reps.items():
        entry: dict[str, Any] = {name: median_of(results, name) for name in FIGURES}
        entry["ratios"] = [r["ratio"] for r in results]
        entry["reps"] = results
        out["rows"][row_key] = entry
    for alias, results in costs.items():
        out["cost"][alias] = {
            where: {
                "us": statistics.median(r[where]["us"] for r in results),
                **{k: v for k, v in results[-1][where].items() if k != "us"},
            }
            for where in ("in_loop", "sync")
        }
        out["cost"][alias]["reps"] = results
    return out


FIGURES = (
    "without_ops_per_s",
    "with_ops_per_s",
    "ratio",
    "reader_calls",
    "reader_us",
    "reader_share",
)


def interval_label(interval: float) -> str:
    if interval < 1:
        return f"stats() every {interval * 1000:g} ms"
    return f"stats() every {interval:g} s"


def cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    width = 10
    heads = ["without", "with", "ratio", "calls", "us/call", "share"]
    lines = [
        f"stats() under load: ops/s without the reader and with it, in alternating slices of "
        f"{args.slice:g} s (or the interval, if longer) over {args.seconds:g} s;",
        f"  ratio: with / without, median of {args.reps} reps (each rep's in brackets); the "
        "reader's calls per measurement,",
        "  their median duration under load, and its share (time in stats() / time with the "
        "reader); medians of the reps",
        f"{'':<28}" + "".join(f"{head:>{width}}" for head in heads) + "  per rep",
    ]
    rows = rows_of(args)
    for short in SHORTS:
        for config in CONFIGS:
            for kind, what in kinds(args):
                lines.append(f"{bench.LABELS[SHORTS[short]]} {config}: {what}")
                for row in rows:
                    if row.group != f"{short}:{config}:{kind}":
                        continue
                    label = interval_label(row.interval)
                    entry = summary["rows"].get(row.key)
                    if entry is None:
                        lines.append(f"  {label:<26}{'error':>{width}}")
                        continue
                    share = entry["reader_share"]
                    cells = [
                        cell(entry["without_ops_per_s"], ",.0f"),
                        cell(entry["with_ops_per_s"], ",.0f"),
                        cell(entry["ratio"], ".3f"),
                        cell(entry["reader_calls"], ",.0f"),
                        cell(entry["reader_us"], ",.1f"),
                        cell(None if share is None else share * 100, ".2f") + "%",
                    ]
                    per_rep = " ".join(cell(r, ".3f") for r in entry["ratios"])
                    text = "".join(f"{c:>{width}}" for c in cells)
                    lines.append(f"  {label:<26}{text}  [{per_rep}]")
    lines += [
        "",
        f"one stats() call: median of {args.calls} back to back (us), nothing else running; "
        f"median of {args.reps} reps",
        "  in a loop: in an event loop whose pools are open (the async path's report); sync: "
        "outside any loop",
        f"{'':<28}{'in a loop':>{width}}{'pools':>7}{'bytes':>7}{'sync':>{width}}"
        f"{'pools':>7}{'bytes':>7}",
    ]
    for short in SHORTS:
        for config in CONFIGS:
            label = f"{bench.LABELS[SHORTS[short]]} {config}"
            found = summary["cost"].get(alias_of(short, config))
            if found is None:
                lines.append(f"  {label:<26}{'error':>{width}}")
                continue
            cells = []
            for where in ("in_loop", "sync"):
                each = found[where]
                cells.append(f"{each['us']:>{width},.1f}{each['pools_listed']:>7}")
                cells.append(f"{each['bytes']:>7,}")
            lines.append(f"  {label:<26}" + "".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Driving the run
# ---------------------------------------------------------------------------


def intervals(text: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in text.split(",") if part.strip())
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("positive seconds, comma-separated")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (3)")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="seconds of one measurement, both sides (2)"
    )
    parser.add_argument(
        "--slice",
        type=float,
        default=0.1,
        help="seconds of a slice without or with the reader (0.1; at least the interval)",
    )
    parser.add_argument(
        "--intervals",
        type=intervals,
        default=(0.01,),
        help="seconds between the reader's stats() calls, comma-separated: a row each (0.01)",
    )
    parser.add_argument("--tasks", type=int, default=bench.TASKS, help="async callers (100)")
    parser.add_argument(
        "--threads",
        type=int,
        default=bench.THREADS,
        help="threads of the sync rows (8; 0: no such rows)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="replicas in the big configuration's LOCATION (2; 0: client_cache only)",
    )
    parser.add_argument(
        "--calls", type=int, default=1000, help="stats() calls timed for one call's cost (1000)"
    )
    parser.add_argument(
        "--cap", type=float, default=30.0, help="seconds a measurement may overrun (30)"
    )
    bench.script_options(parser, pin="split", max_seconds=300)
    args = parser.parse_args(argv)
    if min(args.reps, args.tasks, args.calls) < 1 or min(args.seconds, args.slice, args.cap) <= 0:
        parser.error("--reps, --seconds, --slice, --tasks, --calls and --cap must be positive")
    if args.threads < 0 or args.replicas < 0:
        parser.error("--threads and --replicas must not be negative")
    return args


def start_replicas(primary: RedisServer, count: int) -> list[RedisServer]:
    """``count`` replicas of ``primary`` (on the servers' CPU), once each is in sync."""
    replicas: list[RedisServer] = []
    try:
        for _ in range(count):
            with bench.on_server_cpu():
                replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port))
            replicas.append(replica)
        for replica in replicas:
            wait_until(lambda: replica_synced(replica), 20, "a replica to sync")  # noqa: B023
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def seed(entries: dict[str, Any], replicas: list[RedisServer]) -> None:
    """The key of every alias, written through it, on every replica too (bounded)."""
    for alias in entries:
        cache: Any = caches[alias]
        cache.set(KEY, VALUE)
        stored = cache.make_and_validate_key(KEY)
        for replica in replicas:
            with replica.client() as client:
                wait_until(lambda: client.exists(stored), 10, "the key on a replica")  # noqa: B023


def run(
    args: argparse.Namespace, prefix: str
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]], list[str]]:
    """Every row of every repetition on throwaway servers: the per-rep results by row, the
    per-rep costs of one call by alias, and where the servers were."""
    server = bench.start_redis()
    servers = [server]
    try:
        replicas = start_replicas(server, args.replicas)
        servers += replicas
        plain = f"{server.url}/0"
        big_location = [plain, *(f"{replica.url}/0" for replica in replicas)]
        entries = {}
        for short, dotted in SHORTS.items():
            for config in CONFIGS:
                location: Any = plain if config == "plain" else big_location
                options = {"client_cache": True} if config == "big" else {}
                alias = alias_of(short, config)
                key_prefix = f"{prefix}{short}:{config}"
                entries[alias] = bench.cache_entry(dotted, location, key_prefix, options)
        rows = rows_of(args)
        reps: dict[str, list[dict[str, Any]]] = {}
        costs: dict[str, list[dict[str, Any]]] = {}
        failed: set[str] = set()
        with override_settings(CACHES={**settings.CACHES, **entries}):
            try:
                seed(entries, replicas)
                for rep in range(args.reps):
                    started = time.monotonic()
                    for row in rotated(rows, rep):
                        if row.key in failed:
                            continue
                        try:
                            result = measure(row, args)
                        except Exception as exc:
                            note_error(row.key, exc)
                            failed.add(row.key)
                            reps.pop(row.key, None)
                            continue
                        result["rep"] = rep
                        reps.setdefault(row.key, []).append(result)
                    for alias in rotated(list(entries), rep):
                        if alias in failed:
                            continue
                        try:
                            costs.setdefault(alias, []).append({"rep": rep, **cost(alias, args)})
                        except Exception as exc:
                            note_error(alias, exc)
                            failed.add(alias)
                            costs.pop(alias, None)
                    progress(f"[rep {rep + 1}/{args.reps}] {time.monotonic() - started:.1f} s")
            finally:
                bench.close_backends(entries)  # before the servers stop
                bench.close_client_caches()
    finally:
        for each in reversed(servers):
            each.stop()
    return reps, costs, [redact(each.url) for each in servers]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return bench.run_script("health", args, NOTES, lambda cpus: report(args, cpus))


def report(
    args: argparse.Namespace, cpus: tuple[int, int | None] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's tables printed; its JSON document and meta returned."""
    prefix = f"health:{secrets.token_hex(4)}:"
    rows = rows_of(args)
    seconds = sum(args.seconds + args.slice + 0.3 for _ in rows) * args.reps + 3
    progress(f"health: {len(rows)} rows x {args.reps} reps (about {seconds:.0f} s)")
    reps, costs, servers = run(args, prefix)
    summary = summarize(reps, costs)
    print("\n" + table(summary, args))
    document: dict[str, Any] = {**summary, "errors": ERRORS}
    meta: dict[str, Any] = {"servers": servers}
    if cpus is not None:  # with split, the servers' CPU
        meta["pinned"] = {"mode": args.pin, "this_process": cpus[0], "other": cpus[1]}
    return document, meta


if __name__ == "__main__":
    sys.exit(main())
