"""Redis cache backends for Django with native sync and asyncio paths and shared pools.

``RedisEXCache`` (sync-first: WSGI, sessions) and ``AsyncRedisEXCache`` (asyncio-first: ASGI)
both offer Django's whole cache API, sync and async. Sync methods run on ``redis.Redis`` and
async methods on ``redis.asyncio.Redis``, without hopping threads or starting event loops.
Connection pools live in one process-wide registry (per event loop for asyncio), not on the
cache objects that Django creates per thread and per request (Django ticket #35651).

Data and settings are interchangeable with ``django.core.cache.backends.redis.RedisCache``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import inspect
import logging
import pickle
import random
import re
import sys
import threading
import time
import types
from collections.abc import AsyncGenerator, Callable, Generator, Hashable, Iterable
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

import django
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.exceptions import ImproperlyConfigured
from django.utils.functional import cached_property
from django.utils.module_loading import import_string

__all__ = ["AsyncRedisEXCache", "RedisEXCache", "RedisSerializer"]
__version__ = "2.0.0"

logger = logging.getLogger("django_redis_ex")


# ---------------------------------------------------------------------------
# Serializers
# ---------------------------------------------------------------------------


class RedisSerializer:
    """Django's RedisCache format: ``int`` stored raw so INCR works, everything else pickled."""

    def __init__(self, protocol: int | None = None) -> None:
        self.protocol = pickle.HIGHEST_PROTOCOL if protocol is None else protocol

    def dumps(self, obj: Any) -> Any:
        # type(), not isinstance(): bool must be pickled, or it would read back as an int.
        if type(obj) is int:
            return obj
        return pickle.dumps(obj, self.protocol)

    def loads(self, data: bytes) -> Any:
        # Pickles of protocol 2+ start with PROTO (0x80); raw ints never do, so skip int().
        if data[:1] == b"\x80":
            return pickle.loads(data)
        try:
            return int(data)
        except ValueError:
            return pickle.loads(data)


# ---------------------------------------------------------------------------
# Configuration: LOCATION and OPTIONS
# ---------------------------------------------------------------------------

# OPTIONS keys this module consumes itself; every other key goes to redis-py's pool.
_OWN_OPTIONS = frozenset({"serializer", "pool_class", "parser_class"})

# Defaults that differ from redis-py's: wait for a free connection instead of failing past
# 100, and never hang on a server that does not answer.
_DEFAULT_POOL_OPTIONS: dict[str, Any] = {
    "max_connections": 50,
    "timeout": 20,
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
}


def _redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0].partition(":")[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[2]}"))


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for an option value, equal for equal values."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, *(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return value


@functools.cache
def _accepted_arguments(*classes: type) -> frozenset[str]:
    """Keyword arguments the ``__init__`` of these classes (and their bases) accept."""
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            names.update(
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
    names.discard("self")
    return frozenset(names)


def _import(value: Any) -> Any:
    return import_string(value) if isinstance(value, str) else value


def _twin_class(cls: type, package: types.ModuleType, prefix: str) -> type | None:
    """The asyncio (or sync) class of redis-py that matches ``cls`` by name, if any."""
    name = cls.__name__
    # _AsyncRESP2Parser <-> _RESP2Parser; ConnectionPool <-> ConnectionPool.
    twin_name = "_" + name[6:] if name.startswith("_Async") else "_Async" + name[1:]
    for candidate in (twin_name, name):
        twin = getattr(package, candidate, None)
        if isinstance(twin, type) and twin is not cls and twin.__module__.startswith(prefix):
            return twin
    return None


class _WaitingPool(redis.ConnectionPool):
    """redis-py's pool, as fast; when all connections are busy, callers wait for one.

    ``redis.BlockingConnectionPool`` waits too, but costs a queue round trip on every call.
    """

    def __init__(self, *args: Any, timeout: float | None = 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._released = threading.Condition(threading.Lock())
        self._waiting = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                return super().get_connection(*args, **kwargs)
            except redis.exceptions.MaxConnectionsError:
                pass
            with self._released:
                # Counted, then checked: a release either shows here or sees the count.
                self._waiting += 1
                try:
                    if not self._available_connections and not self._has_room():
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise redis.ConnectionError(_pool_exhausted(self))
                        self._released.wait(remaining)
                finally:
                    self._waiting -= 1

    def _has_room(self) -> bool:
        return bool(self._created_connections < self.max_connections)

    def release(self, connection: Any) -> None:
        super().release(connection)
        if self._waiting:
            with self._released:
                self._released.notify()


class _AsyncWaitingPool(redis.asyncio.ConnectionPool):
    """The asyncio twin of ``_WaitingPool``: one per event loop, so asyncio futures suffice."""

    def __init__(self, *args: Any, timeout: float | None = 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while True:
            with contextlib.suppress(redis.exceptions.MaxConnectionsError):
                return await super().get_connection(*args, **kwargs)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise redis.ConnectionError(_pool_exhausted(self))
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except BaseException as error:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving: pass the turn on
                if isinstance(error, asyncio.TimeoutError):
                    raise redis.ConnectionError(_pool_exhausted(self)) from None
                raise

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _pool_exhausted(pool: Any) -> str:
    return (
        f"No free Redis connection within {pool.timeout} s: all {pool.max_connections} "
        "of the pool are in use. Raise OPTIONS 'max_connections', or 'timeout' (the wait)."
    )


class _Config:
    """One cache alias's LOCATION and OPTIONS, checked once, ready to build pools from."""

    def __init__(self, servers: list[str], options: dict[str, Any]) -> None:
        self.servers = servers
        pool_class = _import(options.get("pool_class"))
        parser_class = _import(options.get("parser_class"))
        serializer = _import(options.get("serializer"))
        if isinstance(serializer, type):
            serializer = serializer()
        self.serializer = serializer or RedisSerializer()

        self.sync_pool_class, self.async_pool_class = self._pool_classes(pool_class)
        redis_options = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        self._check_keys(redis_options)
        # The pool key holds what the user set, so equal settings share a pool.
        self.frozen = _freeze(options)
        defaults = {**_DEFAULT_POOL_OPTIONS, "driver_info": _driver_info()}
        self.sync_options = self._pool_options(self.sync_pool_class, defaults, redis_options)
        self.async_options = self._pool_options(self.async_pool_class, defaults, redis_options)
        if parser_class is not None:
            self.sync_options["parser_class"] = self._parser(parser_class, sync=True)
            self.async_options["parser_class"] = self._parser(parser_class, sync=False)
            if "RESP2" in parser_class.__name__ and "protocol" not in options:
                # redis-py 8 speaks RESP3 unless told otherwise, which a RESP2 parser can't read.
                self.sync_options["protocol"] = self.async_options["protocol"] = 2

    @staticmethod
    def _pool_options(
        pool_class: type, defaults: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        """The arguments for ``pool_class.from_url``: our defaults that it takes, then OPTIONS."""
        accepted = _accepted_arguments(pool_class)
        wanted = {k: v for k, v in defaults.items() if k != "timeout" or k in accepted}
        return {**wanted, **options}

    @staticmethod
    def _pool_classes(pool_class: Any) -> tuple[Any, Any]:
        """The sync and asyncio pool classes; a standard redis-py class maps to its twin."""
        if pool_class is None:
            return _WaitingPool, _AsyncWaitingPool
        if issubclass(pool_class, redis.asyncio.ConnectionPool):
            twin = _twin_class(pool_class, redis, "redis.connection")
            return twin or _WaitingPool, pool_class
        if not issubclass(pool_class, redis.ConnectionPool):
            raise ImproperlyConfigured(
                f"OPTIONS 'pool_class' must be a redis-py ConnectionPool class, not {pool_class!r}."
            )
        twin = _twin_class(pool_class, redis.asyncio, "redis.asyncio.connection")
        return pool_class, twin or _AsyncWaitingPool

    @staticmethod
    def _parser(parser_class: type, *, sync: bool) -> type:
        import redis._parsers as parsers

        is_async = parser_class.__name__.startswith("_Async")
        if is_async != sync:
            return parser_class
        twin = _twin_class(parser_class, parsers, "redis._parsers")
        if twin is None:
            kind = "sync" if sync else "asyncio"
            raise ImproperlyConfigured(
                f"OPTIONS 'parser_class' {parser_class!r} has no {kind} counterpart in redis-py."
            )
        return twin

    def _check_keys(self, redis_options: dict[str, Any]) -> None:
        connection_classes: tuple[type, ...] = (
            redis.connection.Connection,
            redis.connection.SSLConnection,
            redis.connection.UnixDomainSocketConnection,
            redis.asyncio.connection.Connection,
            redis.asyncio.connection.SSLConnection,
            redis.asyncio.connection.UnixDomainSocketConnection,
        )
        custom = redis_options.get("connection_class")
        if isinstance(custom, type):
            connection_classes += (custom,)
        accepted = _accepted_arguments(
            self.sync_pool_class, self.async_pool_class, *connection_classes
        )
        unknown = sorted(set(redis_options) - accepted)
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown key(s) in the cache's OPTIONS: {', '.join(map(repr, unknown))}. "
                f"OPTIONS takes {', '.join(sorted(_OWN_OPTIONS))} and redis-py's "
                "connection pool arguments (max_connections, socket_timeout, db, ...)."
            )

    def pool_key(self, kind: str, index: int) -> tuple[Hashable, ...]:
        return (kind, self.servers[index], self.frozen)

    def make_sync_client(self, index: int) -> redis.Redis:
        pool = self.sync_pool_class.from_url(self.servers[index], **self.sync_options)
        return _SharedRedis(connection_pool=pool)

    def make_async_client(self, index: int) -> redis.asyncio.Redis:
        pool = self.async_pool_class.from_url(self.servers[index], **self.async_options)
        return _SharedAsyncRedis(connection_pool=pool)


@functools.cache
def _driver_info() -> Any:
    """The CLIENT SETINFO name Django's own backend sends, so servers see the same client."""
    version = django.get_version()
    if hasattr(redis, "DriverInfo"):
        return redis.DriverInfo().add_upstream_driver("django", version)
    return None


# ---------------------------------------------------------------------------
# The pool cache (Django ticket #35651)
# ---------------------------------------------------------------------------


class _SharedRedis(redis.Redis):
    """A sync client on a shared pool; closing it never closes the pool."""


class _SharedAsyncRedis(redis.asyncio.Redis):
    """An asyncio client on a shared pool; ``aclose()`` releases only its own connection."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        # Other cache objects on this loop use the pool: it is closed with the loop instead.
        await super().aclose(close_connection_pool=False)


class _PoolRegistry:
    """Process-wide clients (each on its own pool), keyed by configuration.

    Sync clients: one per key per process (redis-py resets a pool after ``fork()``).
    Asyncio clients: one per key per event loop, since a connection belongs to the loop that
    opened it. A loop's pools are disconnected when the loop shuts down its async generators
    (``asyncio.run``, ``async_to_sync``, uvicorn) and dropped, at the latest when another loop
    needs a pool, once the loop is closed. Reads take no lock; creation does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: dict[Hashable, redis.Redis] = {}
        self._loops: dict[asyncio.AbstractEventLoop, _LoopClients] = {}

    def sync_client(self, key: Hashable, make: Callable[[], redis.Redis]) -> redis.Redis:
        client = self._sync.get(key)
        if client is None:
            with self._lock:
                client = self._sync.get(key)
                if client is None:
                    client = self._sync[key] = make()
        return client

    def async_client(
        self, key: Hashable, make: Callable[[], redis.asyncio.Redis]
    ) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        entry = self._loops.get(loop)
        client = entry.clients.get(key) if entry is not None else None
        if client is None:
            with self._lock:
                entry = self._loops.get(loop)
                if entry is None:
                    self._drop_closed_loops()
                    entry = self._loops[loop] = _LoopClients(self, loop)
                client = entry.clients.get(key)
                if client is None:
                    client = entry.clients[key] = make()
        return client

    def loop_count(self) -> int:
        """How many event loops have pools here (for tests and monitoring)."""
        return len(self._loops)

    def forget_loop(self, loop: asyncio.AbstractEventLoop) -> dict[Hashable, Any]:
        with self._lock:
            entry = self._loops.pop(loop, None)
        return entry.clients if entry is not None else {}

    def _drop_closed_loops(self) -> None:
        for loop in [loop for loop in self._loops if loop.is_closed()]:
            # Their sockets close when the transports are collected; nothing can await now.
            self._loops.pop(loop).abandon()


class _LoopClients:
    """The clients of one event loop, and the async generator that closes them at shutdown."""

    def __init__(self, registry: _PoolRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.clients: dict[Hashable, redis.asyncio.Redis] = {}
        # Event loops close every live async generator at shutdown (shutdown_asyncgens),
        # while they can still run coroutines: the one hook that asyncio offers.
        self._watcher = self._close_at_shutdown(registry, loop)
        with contextlib.suppress(StopIteration):  # it stops at its yield, registered
            self._watcher.asend(None).send(None)

    @staticmethod
    async def _close_at_shutdown(
        registry: _PoolRegistry, loop: asyncio.AbstractEventLoop
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if not loop.is_closed():
                for client in registry.forget_loop(loop).values():
                    try:
                        await client.connection_pool.disconnect()
                    except Exception:  # pragma: no cover - shutdown must go on
                        logger.warning(
                            "Could not close a Redis pool at loop shutdown", exc_info=True
                        )

    def abandon(self) -> None:
        """Finish the watcher without awaiting, for a loop that closed without shutdown."""
        with contextlib.suppress(StopIteration, RuntimeError):
            self._watcher.aclose().send(None)


_registry = _PoolRegistry()


# ---------------------------------------------------------------------------
# Operations: what each cache method sends to Redis and how the reply becomes a result
# ---------------------------------------------------------------------------
# An operation is a generator: it yields a command (a tuple of arguments) or a pipeline
# (a list of such tuples), receives the reply, and returns the method's result. The sync and
# the asyncio client run the same generators, so the two paths cannot drift apart.

Command = Union[tuple[Any, ...], list[tuple[Any, ...]]]  # noqa: UP007 (3.10 evaluates it)
Operation = Generator[Command, Any, Any]

# Commands that may go to a replica; everything else goes to the first server.
_READ_COMMANDS = frozenset({"GET", "MGET", "EXISTS"})
_SCRIPTS: dict[str, str] = {}


class _Script:
    """A Lua script sent by its SHA1; the client falls back to EVAL after NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        _SCRIPTS[self.sha] = source

    def __call__(self, keys: Iterable[Any], args: Iterable[Any]) -> tuple[Any, ...]:
        keys = tuple(keys)
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


# INCRBY that fails on a missing key instead of creating it, in one round trip.
_INCR_EXISTING = _Script(
    "if redis.call('EXISTS', KEYS[1]) == 0 then return false end "
    "return redis.call('INCRBY', KEYS[1], ARGV[1])"
)
# Return the current value, or store ARGV[1] (expiring after ARGV[2] s unless 0) and nil.
_GET_OR_STORE = _Script(
    "local current = redis.call('GET', KEYS[1]) "
    "if current then return current end "
    "if ARGV[2] == '0' then redis.call('SET', KEYS[1], ARGV[1]) "
    "else redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end "
    "return false"
)
# Move a value to another key (keeping its expiry); 0 if there is none to move.
_RENAME_EXISTING = _Script(
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
    "redis.call('RENAME', KEYS[1], KEYS[2]) return 1"
)


def _set_command(key: str, data: Any, timeout: int | None, *flags: str) -> tuple[Any, ...]:
    if timeout is None:
        return ("SET", key, data, *flags)
    return ("SET", key, data, "EX", timeout, *flags)


def _op_add(serializer: Any, key: str, value: Any, timeout: int | None) -> Operation:
    data = serializer.dumps(value)
    if timeout == 0:
        # Django's add(timeout=0) reports whether the key was free and leaves nothing behind.
        return (yield ("EXISTS", key)) == 0
    return bool((yield _set_command(key, data, timeout, "NX")))


def _op_get(serializer: Any, key: str, default: Any) -> Operation:
    data = yield ("GET", key)
    return default if data is None else serializer.loads(data)


def _op_set(serializer: Any, key: str, value: Any, timeout: int | None) -> Operation:
    data = serializer.dumps(value)
    yield ("DEL", key) if timeout == 0 else _set_command(key, data, timeout)


def _op_touch(key: str, timeout: int | None) -> Operation:
    if timeout is None:
        return bool((yield ("PERSIST", key)))
    return bool((yield ("EXPIRE", key, timeout)))


def _op_delete(key: str) -> Operation:
    return bool((yield ("DEL", key)))


def _op_has_key(key: str) -> Operation:
    return bool((yield ("EXISTS", key)))


def _op_get_many(serializer: Any, key_map: dict[str, Any]) -> Operation:
    values = yield ("MGET", *key_map)
    loads = serializer.loads
    return {
        user_key: loads(data)
        for user_key, data in zip(key_map.values(), values, strict=True)
        if data is not None
    }


def _op_set_many(serializer: Any, data: dict[str, Any], timeout: int | None) -> Operation:
    dumps = serializer.dumps
    encoded = [(key, dumps(value)) for key, value in data.items()]
    if timeout == 0:
        yield ("DEL", *data)
    elif timeout is None:
        yield ("MSET", *[item for pair in encoded for item in pair])
    else:
        yield [("SET", key, value, "EX", timeout) for key, value in encoded]
    return []


def _op_delete_many(keys: list[str]) -> Operation:
    yield ("DEL", *keys)


def _op_incr(key: str, delta: int) -> Operation:
    value = yield _INCR_EXISTING([key], [delta])
    if value is None:
        raise ValueError(f"Key '{key}' not found.")
    return value


def _op_get_or_set(serializer: Any, key: str, default: Any, timeout: int | None) -> Operation:
    data = yield ("GET", key)
    if data is not None:
        return serializer.loads(data)
    if callable(default):
        default = default()
    if timeout == 0:
        return default
    current = yield _GET_OR_STORE([key], [serializer.dumps(default), timeout or 0])
    # Another caller may have stored a value since the GET: theirs wins, as with add().
    return default if current is None else serializer.loads(current)


def _op_move(old_key: str, new_key: str, user_key: Any) -> Operation:
    if not (yield _RENAME_EXISTING([old_key, new_key], [])):
        raise ValueError(f"Key '{user_key}' not found")


def _op_clear() -> Operation:
    return bool((yield ("FLUSHDB",)))


# ---------------------------------------------------------------------------
# Clients: run operations on the shared pools
# ---------------------------------------------------------------------------


class _Client:
    """What both clients share: Django's RedisCacheClient internals and server choice."""

    def __init__(self, config: _Config) -> None:
        self._config = config
        self._servers = config.servers
        self._serializer = config.serializer

    def _get_connection_pool_index(self, write: bool) -> int:
        # Write to the first server. Read from the others if there are more.
        if write or len(self._servers) == 1:
            return 0
        return random.randint(1, len(self._servers) - 1)

    def _index_for(self, command: Command) -> int:
        if type(command) is tuple:
            return self._get_connection_pool_index(command[0] not in _READ_COMMANDS)
        return self._get_connection_pool_index(
            any(args[0] not in _READ_COMMANDS for args in command)
        )


class _SyncClient(_Client):
    """Runs operations on ``redis.Redis`` clients from the process-wide registry."""

    def __init__(self, config: _Config) -> None:
        super().__init__(config)
        self._pool_class = config.sync_pool_class
        self._pool_options = config.sync_options
        self._clients: list[redis.Redis | None] = [None] * len(self._servers)

    def _client_at(self, index: int) -> redis.Redis:
        client = self._clients[index]
        if client is None:
            key = self._config.pool_key("sync", index)
            make = functools.partial(self._config.make_sync_client, index)
            client = self._clients[index] = _registry.sync_client(key, make)
        return client

    def _get_connection_pool(self, write: bool) -> redis.ConnectionPool:
        return self._client_at(self._get_connection_pool_index(write)).connection_pool

    def get_client(self, key: Any = None, *, write: bool = False) -> redis.Redis:
        return self._client_at(self._get_connection_pool_index(write))

    def run(self, operation: Operation) -> Any:
        try:
            command = next(operation)
            while True:
                command = operation.send(self._send(command))
        except StopIteration as done:
            return done.value

    def _send(self, command: Command) -> Any:
        client = self._client_at(self._index_for(command))
        if type(command) is list:
            pipeline = client.pipeline(transaction=False)
            for args in command:
                pipeline.execute_command(*args)
            return pipeline.execute()
        try:
            return client.execute_command(*command)
        except redis.exceptions.NoScriptError:
            return client.execute_command("EVAL", _SCRIPTS[str(command[1])], *command[2:])


class _AsyncClient(_Client):
    """Runs operations on ``redis.asyncio.Redis`` clients of the running event loop."""

    def __init__(self, config: _Config) -> None:
        super().__init__(config)
        self._pool_class = config.async_pool_class
        self._pool_options = config.async_options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[redis.asyncio.Redis | None] = []

    def _client_at(self, index: int) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._clients = loop, [None] * len(self._servers)
        client = self._clients[index]
        if client is None:
            key = self._config.pool_key("async", index)
            make = functools.partial(self._config.make_async_client, index)
            client = self._clients[index] = _registry.async_client(key, make)
        return client

    def _get_connection_pool(self, write: bool) -> redis.asyncio.ConnectionPool:
        index = self._get_connection_pool_index(write)
        if asyncio._get_running_loop() is None:
            # No loop to bind a pool to: a fresh one, unshared, for inspection (Django's tests).
            return self._pool_class.from_url(self._servers[index], **self._pool_options)
        return self._client_at(index).connection_pool

    def get_client(self, key: Any = None, *, write: bool = False) -> redis.asyncio.Redis:
        return self._client_at(self._get_connection_pool_index(write))

    async def run(self, operation: Operation) -> Any:
        try:
            command = next(operation)
            while True:
                command = operation.send(await self._send(command))
        except StopIteration as done:
            return done.value

    async def _send(self, command: Command) -> Any:
        client = self._client_at(self._index_for(command))
        if type(command) is list:
            pipeline = client.pipeline(transaction=False)
            for args in command:
                pipeline.execute_command(*args)
            return await pipeline.execute()
        try:
            return await client.execute_command(*command)
        except redis.exceptions.NoScriptError:
            return await client.execute_command("EVAL", _SCRIPTS[str(command[1])], *command[2:])


# ---------------------------------------------------------------------------
# The cache classes: keys, versions and timeouts; no Redis commands
# ---------------------------------------------------------------------------


class _RedisEXBase(BaseCache):
    """Django's cache API, each method in a sync and a native async form."""

    _client_kind: str

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(params)
        if isinstance(server, str):
            self._servers = re.split("[;,]", server)
        else:
            self._servers = list(server)
        self._options = params.get("OPTIONS") or {}
        self._config = _Config(self._servers, self._options)
        self._serializer = self._config.serializer

    def __repr__(self) -> str:
        servers = ", ".join(_redact(s) for s in self._servers)
        return f"<{type(self).__name__} {servers}>"

    @cached_property
    def _sync_client(self) -> _SyncClient:
        return _SyncClient(self._config)

    @cached_property
    def _async_client(self) -> _AsyncClient:
        return _AsyncClient(self._config)

    @property
    def _class(self) -> type:
        return type(self._cache)

    @property
    def _cache(self) -> Any:
        """Django's client object: sync on RedisEXCache, asyncio on AsyncRedisEXCache."""
        if self._client_kind == "async":
            return self._async_client
        return self._sync_client

    # Raw clients ------------------------------------------------------------

    def get_client(self, key: Any = None, *, write: bool = True) -> redis.Redis:
        """A ``redis.Redis`` on the shared pool (the first server unless ``write=False``)."""
        return self._sync_client.get_client(key, write=write)

    def get_async_client(self, key: Any = None, *, write: bool = True) -> redis.asyncio.Redis:
        """A ``redis.asyncio.Redis`` on the running loop's shared pool."""
        return self._async_client.get_client(key, write=write)

    # Keys and timeouts ------------------------------------------------------

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> int | None:
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        # None keeps the key forever; zero or less deletes it.
        return None if timeout is None else max(0, int(timeout))

    def validate_key(self, key: str) -> None:
        # The common case, checked fast: short, printable ASCII without spaces.
        if len(key) <= 250 and key.isascii() and key.isprintable() and " " not in key:
            return
        super().validate_key(key)

    def _key(self, key: Any, version: int | None) -> str:
        return self.make_and_validate_key(key, version=version)

    def _key_map(self, keys: Iterable[Any], version: int | None) -> dict[str, Any]:
        return {self.make_and_validate_key(key, version=version): key for key in keys}

    # The API, sync and async ------------------------------------------------

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        op = _op_add(
            self._serializer, self._key(key, version), value, self.get_backend_timeout(timeout)
        )
        return self._sync_client.run(op)

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        op = _op_add(
            self._serializer, self._key(key, version), value, self.get_backend_timeout(timeout)
        )
        return await self._async_client.run(op)

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._sync_client.run(_op_get(self._serializer, self._key(key, version), default))

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return await self._async_client.run(
            _op_get(self._serializer, self._key(key, version), default)
        )

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        op = _op_set(
            self._serializer, self._key(key, version), value, self.get_backend_timeout(timeout)
        )
        self._sync_client.run(op)

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        op = _op_set(
            self._serializer, self._key(key, version), value, self.get_backend_timeout(timeout)
        )
        await self._async_client.run(op)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        op = _op_touch(self._key(key, version), self.get_backend_timeout(timeout))
        return self._sync_client.run(op)

    async def atouch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        op = _op_touch(self._key(key, version), self.get_backend_timeout(timeout))
        return await self._async_client.run(op)

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._sync_client.run(_op_delete(self._key(key, version)))

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return await self._async_client.run(_op_delete(self._key(key, version)))

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        key_map = self._key_map(keys, version)
        if not key_map:
            return {}
        return self._sync_client.run(_op_get_many(self._serializer, key_map))

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        key_map = self._key_map(keys, version)
        if not key_map:
            return {}
        return await self._async_client.run(_op_get_many(self._serializer, key_map))

    def get_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        op = _op_get_or_set(
            self._serializer, self._key(key, version), default, self.get_backend_timeout(timeout)
        )
        return self._sync_client.run(op)

    async def aget_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        op = _op_get_or_set(
            self._serializer, self._key(key, version), default, self.get_backend_timeout(timeout)
        )
        return await self._async_client.run(op)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._sync_client.run(_op_has_key(self._key(key, version)))

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return await self._async_client.run(_op_has_key(self._key(key, version)))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._sync_client.run(_op_incr(self._key(key, version), delta))

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self._async_client.run(_op_incr(self._key(key, version), delta))

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self.incr(key, -delta, version=version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self.aincr(key, -delta, version=version)

    def set_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        if not data:
            return []
        op = _op_set_many(
            self._serializer, self._data(data, version), self.get_backend_timeout(timeout)
        )
        return self._sync_client.run(op)

    async def aset_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        if not data:
            return []
        op = _op_set_many(
            self._serializer, self._data(data, version), self.get_backend_timeout(timeout)
        )
        return await self._async_client.run(op)

    def _data(self, data: dict[Any, Any], version: int | None) -> dict[str, Any]:
        return {self.make_and_validate_key(k, version=version): v for k, v in data.items()}

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        redis_keys = list(self._key_map(keys, version))
        if redis_keys:
            self._sync_client.run(_op_delete_many(redis_keys))

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        redis_keys = list(self._key_map(keys, version))
        if redis_keys:
            await self._async_client.run(_op_delete_many(redis_keys))

    def incr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        version = self.version if version is None else version
        self._sync_client.run(self._op_move_version(key, delta, version))
        return version + delta

    async def aincr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        version = self.version if version is None else version
        await self._async_client.run(self._op_move_version(key, delta, version))
        return version + delta

    def _op_move_version(self, key: Any, delta: int, version: int) -> Operation:
        return _op_move(self._key(key, version), self._key(key, version + delta), key)

    def decr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self.incr_version(key, -delta, version)

    async def adecr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self.aincr_version(key, -delta, version)

    def clear(self) -> bool:
        return self._sync_client.run(_op_clear())

    async def aclear(self) -> bool:
        return await self._async_client.run(_op_clear())

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: the pools are shared by every cache object and outlive requests."""

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing to do, as ``close()``."""


class RedisEXCache(_RedisEXBase):
    """Sync-first Redis cache (WSGI, sessions); ``_cache`` is Django's sync client interface."""

    _client_kind = "sync"


class AsyncRedisEXCache(_RedisEXBase):
    """Asyncio-first Redis cache (ASGI); ``_cache.get_client()`` is a ``redis.asyncio.Redis``."""

    _client_kind = "async"


# ---------------------------------------------------------------------------
# The dotted paths of the 1.x package: django_redis_ex.cache and django_redis_ex.async_cache
# ---------------------------------------------------------------------------

for _name, _cls in (("cache", RedisEXCache), ("async_cache", AsyncRedisEXCache)):
    _alias = types.ModuleType(f"{__name__}.{_name}", f"Alias of {__name__}.{_cls.__name__}.")
    setattr(_alias, _cls.__name__, _cls)
    sys.modules[_alias.__name__] = _alias
