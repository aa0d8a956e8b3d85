"""get_or_set at expiry: p99 latency with and without ``stale_while_revalidate``, in one run.

Run from the repository root::

    python benchmarks/stale.py                       # about 1 minute
    python benchmarks/stale.py --reps 5 --json stale.json
    python benchmarks/stale.py --cycles 5 --swr 10
    python benchmarks/bench.py --stale --reps 3      # the same, through bench.py

It reuses bench.py (imported: its Django settings, server, pinning and watchdog) and follows
its method: every row of a repetition is measured side by side with the others (their order
rotated from one repetition to the next), each ratio is taken within one repetition, between
rows so measured, then the median over the repetitions is given. On these 2-core machines
only such ratios mean anything.

The scenario: one key with a short timeout (``--timeout``, 1 s) whose value takes
``--compute`` (200 ms) to compute: ``await asyncio.sleep`` in the async default,
``time.sleep`` in the sync one. ``--tasks`` (200) concurrent asyncio tasks call
``aget_or_set(key, default, timeout)`` in a loop, each pausing ``--pause`` (50 ms) between
two calls (the first pause of each task random, so that their calls are spread), for
``--cycles`` (2) expiries of the key: the measurement lasts cycles x (timeout + compute)
after the key was first computed (not measured). Every call's latency is recorded; the
figures are p50, p99 and max, the computations of the value (the priming one not counted)
and the calls that took at least half a computation ("waited"), each the median of the
repetitions' (``--json``: per repetition too, with ``waited_at``, when the calls that waited
began, in 0.1 s bins: an expiry's waits come together, a stall's are spread).

Rows, per class (``AsyncRedisEXCache`` and ``RedisEXCache``, both on their async path):
``stale_while_revalidate=0`` (the keyword not passed: today's behaviour, stampede protection:
one caller computes under a lock while every other caller waits for its value) and
``stale_while_revalidate=W`` (``--swr``, 5 s: for W seconds after the timeout the stale value
is returned at once while one caller recomputes it, on the async path in a background task),
and the ratio of their p99s (without / with), paired by repetition. Also
``RedisEXCache.get_or_set`` from ``--threads`` (32) threads, both ways (the sync path: the one
caller that recomputes waits for it, the others do not), and, for reference, Django's
``RedisCache``: the steps of its ``aget_or_set`` (``aget``, the default, ``aadd``, ``aget``)
with the default awaited (its own ``aget_or_set`` calls the default without awaiting it, which
an async default cannot be), so without any lock: every caller that misses computes. Until
the module has ``stale_while_revalidate``, its rows are skipped with the reason.

Every wait is bounded (``wait_for``, thread joins, ``--cap`` past a measurement's length, and
``--max-seconds`` for the run, past which the server is stopped and the process exits); the
server is started by the test harness and stopped by PID. It prints a table; ``--json`` writes
every figure, per repetition too. No pass/fail targets: the exit status never depends on a
figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import random
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

EX, AEX, DJANGO = bench.EX, bench.AEX, bench.DJANGO
VALUE = bench.VALUE  # 100 bytes, as bench.py
SHORTS = {"AEX": AEX, "EX": EX, "Django": DJANGO}
WAITED = 0.5  # a call that took this share of a computation or more waited for one
MISSING = object()


@dataclass(frozen=True)
class Row:
    key: str  # what results are filed under: "AEX:0", "EX-threads:5", "Django:0"
    short: str  # the cache: a key of SHORTS
    kind: str  # "async" (aget_or_set), "threads" (get_or_set) or "django" (its steps)
    swr: float  # stale_while_revalidate, seconds; 0: not passed


@dataclass(frozen=True)
class Group:
    title: str
    rows: tuple[Row, ...]  # without SWR first: the ratio is rows[0] / rows[1]


def groups(args: argparse.Namespace) -> list[Group]:
    out = []
    for short, kind, callers in (
        ("AEX", "async", f"{args.tasks} tasks"),
        ("EX", "async", f"{args.tasks} tasks"),
        ("EX", "threads", f"{args.threads} threads"),
    ):
        name = short if kind == "async" else f"{short}-{kind}"
        method = "aget_or_set" if kind == "async" else "get_or_set"
        title = f"{bench.LABELS[SHORTS[short]]}.{method}, {callers}"
        rows = tuple(Row(f"{name}:{swr:g}", short, kind, swr) for swr in (0, args.swr))
        if kind != "threads" or args.threads > 0:
            out.append(Group(title, rows))
    if args.django:
        title = f"Django's RedisCache: aget, default, aadd, aget; {args.tasks} tasks"
        out.append(Group(title, (Row("Django:0", "Django", "django", 0),)))
    return out


NOTES = bench.Notes()
ERRORS, SKIPPED, note_error, note_skip = NOTES.errors, NOTES.skipped, NOTES.error, NOTES.skip
progress, rotated = bench.progress, bench.rotated


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0 to 1) of sorted ``ordered``."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def seconds_of(args: argparse.Namespace) -> float:
    """How long the callers of one measurement call: ``--cycles`` expiries and their
    recomputations, after the priming computation."""
    return float(args.cycles * (args.timeout + args.compute))


class Counter:
    """Computations of the value: started, and running now (threads and tasks alike)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.running = 0

    def enter(self) -> None:
        with self.lock:
            self.started += 1
            self.running += 1

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


Call = tuple[float, float]  # when a call began (seconds into the measurement), its latency


def figures(
    calls: list[Call], counter: Counter, wrong: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One measurement's figures (latencies in ms). ``waited_at``: when the calls that waited
    began, in 0.1 s bins (bin start: calls), to tell an expiry's waits from a stall."""
    if not calls:
        raise RuntimeError("no call completed")
    ordered = sorted(latency for _, latency in calls)
    bins: dict[float, int] = {}
    for began, latency in calls:
        if latency >= WAITED * args.compute:
            slot = round(math.floor(began * 10) / 10, 1)
            bins[slot] = bins.get(slot, 0) + 1
    return {
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "calls": len(ordered),
        "computations": counter.started,
        "waited": sum(1 for latency in ordered if latency >= WAITED * args.compute),
        "wrong_values": wrong,
        "waited_at": dict(sorted(bins.items())),
    }


def swr_kwargs(row: Row) -> dict[str, Any]:
    return {"stale_while_revalidate": row.swr} if row.swr else {}


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


AsyncOp = bench.AsyncOp


def async_op(row: Row, alias: str, key: str, counter: Counter, args: argparse.Namespace) -> AsyncOp:
    cache: Any = caches[alias]  # ours: aget_or_set(..., stale_while_revalidate=)
    timeout, compute_seconds = args.timeout, args.compute

    async def compute() -> bytes:
        counter.enter()
        try:
            await asyncio.sleep(compute_seconds)
            return VALUE
        finally:
            counter.leave()

    if row.kind == "django":

        async def steps() -> Any:  # BaseCache.aget_or_set, the default awaited
            value = await cache.aget(key, MISSING)
            if value is MISSING:
                value = await compute()
                await cache.aadd(key, value, timeout)
                value = await cache.aget(key, value)
            return value

        return steps
    extra = swr_kwargs(row)
    return lambda: cache.aget_or_set(key, compute, timeout, **extra)


async def _measure_async(row: Row, alias: str, key: str, args: argparse.Namespace) -> Any:
    counter = Counter()
    op = async_op(row, alias, key, counter, args)
    cache: Any = caches[alias]
    # Warm-up: one read per task opens the connections (and Django's executor thread).
    warming = (cache.aget(f"warm:{i}") for i in range(args.tasks))
    await asyncio.wait_for(asyncio.gather(*warming), args.cap)
    calls: list[Call] = []
    wrong = 0
    gc.collect()
    if await asyncio.wait_for(op(), args.cap) != VALUE:  # the priming computation
        raise RuntimeError("the priming get_or_set did not return the value")
    counter.started = 0
    began = time.perf_counter()
    deadline = began + seconds_of(args)

    async def caller(first_pause: float) -> None:
        nonlocal wrong
        await asyncio.sleep(first_pause)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            value = await op()
            calls.append((start - began, time.perf_counter() - start))
            wrong += value != VALUE
            await asyncio.sleep(args.pause)

    callers = (caller(random.uniform(0, args.pause)) for _ in range(args.tasks))
    await asyncio.wait_for(asyncio.gather(*callers), seconds_of(args) + args.cap)
    # A recomputation still running in the background: counted, and not left behind (the
    # loop's other tasks, such as a connection's reader, are the cache's, closed with it).
    settle_by = time.monotonic() + args.compute + 1
    await asyncio.sleep(0.01)
    while counter.running and time.monotonic() < settle_by:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)  # its value stored, its lock let go
    result = figures(calls, counter, wrong, args)
    result["left_running"] = counter.running
    return result


def measure_async(row: Row, alias: str, key: str, args: argparse.Namespace) -> Any:
    """The measurement on a new event loop, as bench.py measures."""
    return asyncio.run(_measure_async(row, alias, key, args))


def measure_threads(row: Row, alias: str, key: str, args: argparse.Namespace) -> Any:
    counter = Counter()
    extra = swr_kwargs(row)
    timeout, compute_seconds = args.timeout, args.compute

    def compute() -> bytes:
        counter.enter()
        try:
            time.sleep(compute_seconds)
            return VALUE
        finally:
            counter.leave()

    barrier = threading.Barrier(args.threads + 1)
    failures: list[BaseException] = []
    calls: list[list[Call]] = [[] for _ in range(args.threads)]
    wrong = [0] * args.threads
    began, deadline = [0.0], [0.0]

    def worker(index: int) -> None:
        try:
            cache: Any = caches[alias]  # this thread's cache object, as Django's
            cache.get(f"warm:{index}")
            barrier.wait(timeout=args.cap)
            time.sleep(random.uniform(0, args.pause))
            mine = calls[index]
            while time.perf_counter() < deadline[0]:
                start = time.perf_counter()
                value = cache.get_or_set(key, compute, timeout, **extra)
                mine.append((start - began[0], time.perf_counter() - start))
                wrong[index] += value != VALUE
                time.sleep(args.pause)
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True, name=f"stale: caller {i}")
        for i in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    gc.collect()
    try:
        cache: Any = caches[alias]
        if cache.get_or_set(key, compute, timeout, **extra) != VALUE:  # priming
            raise RuntimeError("the priming get_or_set did not return the value")
        counter.started = 0
        began[0] = time.perf_counter()
        deadline[0] = began[0] + seconds_of(args)
        barrier.wait(timeout=args.cap)
    except BaseException:
        barrier.abort()
        raise
    finally:
        join_by = time.monotonic() + seconds_of(args) + args.cap
        for thread in threads:
            thread.join(max(0.0, join_by - time.monotonic()))
    if failures:
        raise failures[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"callers still running {args.cap:.0f} s after the measurement")
    settle_by = time.monotonic() + args.compute + 1  # a recomputation in another thread
    while counter.running and time.monotonic() < settle_by:
        time.sleep(0.01)
    result = figures([call for mine in calls for call in mine], counter, sum(wrong), args)
    result["left_running"] = counter.running
    return result


def measure(row: Row, alias: str, key: str, args: argparse.Namespace) -> Any:
    if row.kind == "threads":
        return measure_threads(row, alias, key, args)
    return measure_async(row, alias, key, args)


# ---------------------------------------------------------------------------
# Summary and table
# ---------------------------------------------------------------------------


FIGURES = ("p50_ms", "p99_ms", "max_ms", "computations", "waited", "calls")


def summarize(reps: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Per row: the median of each figure over the repetitions; per group with both rows:
    p99 without SWR / p99 with it, per repetition and their median."""
    out: dict[str, Any] = {"rows": {}, "ratios": {}}
    for row_key, results in reps.items():
        entry: dict[str, Any] = {f: statistics.median(r[f] for r in results) for f in FIGURES}
        entry["wrong_values"] = sum(r["wrong_values"] for r in results)
        entry["reps"] = results
        out["rows"][row_key] = entry
    for group in groups(args):
        if len(group.rows) != 2:
            continue
        without, with_ = (reps.get(row.key, []) for row in group.rows)
        theirs = {r["rep"]: r["p99_ms"] for r in with_}
        ratios = [r["p99_ms"] / theirs[r["rep"]] for r in without if theirs.get(r["rep"])]
        out["ratios"][group.rows[0].key.split(":")[0]] = {
            "p99_without_over_with": statistics.median(ratios) if ratios else None,
            "reps": ratios,
        }
    return out


def table(summary: dict[str, Any], args: argparse.Namespace) -> str:
    width = 11
    heads = ["p50 ms", "p99 ms", "max ms", "computed", "waited", "calls"]
    expiries = "1 expiry" if args.cycles == 1 else f"{args.cycles} expiries"
    lines = [
        f"get_or_set at expiry: key timeout {args.timeout} s, computation "
        f"{args.compute * 1000:.0f} ms, {expiries} per measurement ({seconds_of(args):.1f} s),",
        f"a pause of {args.pause * 1000:.0f} ms between a caller's calls; median of "
        f"{args.reps} reps (ratio: median of per-rep ratios)",
        f"  computed: computations of the value (the priming one not counted); waited: calls "
        f"of {WAITED * args.compute * 1000:.0f} ms or more",
        f"{'':<36}" + "".join(f"{head:>{width}}" for head in heads),
    ]
    for group in groups(args):
        lines.append(group.title)
        for row in group.rows:
            if row.kind == "django":
                label = "no lock, no SWR"
            elif row.swr:
                label = f"stale_while_revalidate={row.swr:g}"
            else:
                label = "SWR 0 (stampede protection)"
            entry = summary["rows"].get(row.key)
            if entry is None:
                reason = "not measured" if row.key in SKIPPED else "error"
                lines.append(f"  {label:<34}{reason:>{width}}")
                continue
            out = [f"{entry[f]:,.1f}" for f in FIGURES[:3]]
            out += [f"{entry[f]:,.0f}" for f in FIGURES[3:]]
            text = "".join(f"{cell:>{width}}" for cell in out)
            if entry["wrong_values"]:
                text += f"  ({entry['wrong_values']} wrong values)"
            lines.append(f"  {label:<34}{text}")
        ratio = summary["ratios"].get(group.rows[0].key.split(":")[0])
        if ratio is not None:
            value = ratio["p99_without_over_with"]
            text = "-" if value is None else f"{value:.1f}x"
            lines.append(f"  {'p99 without SWR / with SWR':<34}{text:>{width}}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Driving the run
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions (3)")
    parser.add_argument("--timeout", type=int, default=1, help="the key's timeout, seconds (1)")
    parser.add_argument(
        "--compute", type=float, default=0.2, help="seconds a computation takes (0.2)"
    )
    parser.add_argument(
        "--swr", type=float, default=5.0, help="stale_while_revalidate, seconds (5)"
    )
    parser.add_argument("--cycles", type=int, default=2, help="expiries per measurement (2)")
    parser.add_argument("--tasks", type=int, default=200, help="concurrent async callers (200)")
    parser.add_argument(
        "--threads", type=int, default=32, help="threads of the sync rows (32; 0: no such rows)"
    )
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds between a caller's calls (0.05)"
    )
    parser.add_argument(
        "--django",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the reference row of Django's RedisCache (on)",
    )
    parser.add_argument(
        "--cap", type=float, default=30.0, help="seconds a measurement may overrun (30)"
    )
    bench.script_options(parser, pin="shared", max_seconds=300)
    args = parser.parse_args(argv)
    if min(args.reps, args.timeout, args.cycles, args.tasks) < 1 or args.swr <= 0:
        parser.error("--reps, --timeout, --swr, --cycles and --tasks must be positive")
    if args.compute <= 0 or args.pause < 0 or args.threads < 0 or args.cap <= 0:
        parser.error("--compute and --cap must be positive, --pause and --threads not negative")
    return args


def run(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """Every row of every repetition on one throwaway server; the per-rep results by row."""
    server = bench.start_redis()
    url = f"{server.url}/0"
    entries = {
        f"stale-{short}": bench.cache_entry(dotted, url, f"{prefix}{short}", {})
        for short, dotted in SHORTS.items()
    }
    rows = [row for group in groups(args) for row in group.rows]
    reps: dict[str, list[dict[str, Any]]] = {}
    failed: set[str] = set()
    try:
        with override_settings(CACHES={**settings.CACHES, **entries}):
            try:
                for rep in range(args.reps):
                    started = time.monotonic()
                    for row in rotated(rows, rep):
                        if row.key in failed:
                            continue
                        try:
                            result = measure(row, f"stale-{row.short}", f"k:{row.key}:{rep}", args)
                        except TypeError as exc:
                            if row.swr and "stale_while_revalidate" in str(exc):
                                note_skip(
                                    row.key, f"the module has no stale_while_revalidate yet ({exc})"
                                )
                            else:
                                note_error(row.key, exc)
                            failed.add(row.key)
                            reps.pop(row.key, None)
                            continue
                        except Exception as exc:
                            note_error(row.key, exc)
                            failed.add(row.key)
                            reps.pop(row.key, None)
                            continue
                        result["rep"] = rep
                        reps.setdefault(row.key, []).append(result)
                    progress(f"[rep {rep + 1}/{args.reps}] {time.monotonic() - started:.1f} s")
            finally:
                bench.close_backends(entries)  # before the server stops
                bench.close_client_caches()
    finally:
        server.stop()
    return reps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return bench.run_script("stale", args, NOTES, lambda cpus: report(args))


def report(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's tables printed; its JSON document and meta returned."""
    prefix = f"swr:{secrets.token_hex(4)}:"
    rows = sum(len(group.rows) for group in groups(args))
    progress(
        f"stale: {rows} rows x {args.reps} reps, {seconds_of(args):.1f} s of calls each "
        f"(about {rows * args.reps * (seconds_of(args) + 0.45):.0f} s)"
    )
    reps = run(args, prefix)
    summary = summarize(reps, args)
    print("\n" + table(summary, args))
    document: dict[str, Any] = {**summary, "errors": ERRORS, "skipped": SKIPPED}
    meta = {
        "seconds_per_measurement": seconds_of(args),
        "waited_ms": WAITED * args.compute * 1000,
    }
    return document, meta


if __name__ == "__main__":
    sys.exit(main())
