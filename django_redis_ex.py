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
import bz2
import collections
import contextlib
import datetime
import functools
import gzip
import hashlib
import inspect
import json
import logging
import lzma
import os
import pickle
import random
import re
import sys
import threading
import time
import types
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Hashable,
    Iterable,
    Iterator,
)
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlsplit, urlunsplit

import django
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.connection
import redis.retry
import redis.sentinel
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, default_key_func
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.functional import cached_property
from django.utils.module_loading import import_string

__all__ = ["AsyncRedisEXCache", "RedisEXCache", "RedisSerializer"]
__version__ = "2.0.0"

logger = logging.getLogger("django_redis_ex")


# ---------------------------------------------------------------------------
# Serializers and compressors
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


class JSONSerializer:
    """JSON through Django's encoder (dates, decimals, UUIDs become strings)."""

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, cls=DjangoJSONEncoder, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgPackSerializer:
    """MessagePack, with the ``msgpack`` package (``pip install django-redis-ex[msgpack]``)."""

    def __init__(self) -> None:
        import msgpack

        self._msgpack = msgpack

    def dumps(self, obj: Any) -> bytes:
        return self._msgpack.packb(obj, use_bin_type=True)

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False)


_SERIALIZERS: dict[str, Callable[[], Any]] = {
    "pickle": RedisSerializer,
    "json": JSONSerializer,
    "msgpack": MsgPackSerializer,
}


def _zstd() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    import zstandard

    return zstandard.ZstdCompressor().compress, zstandard.ZstdDecompressor().decompress


def _lz4() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    import lz4.frame

    return lz4.frame.compress, lz4.frame.decompress


# name: (tag written after the header, loader of (compress, decompress)). Tags never change,
# so a value stays readable whatever the compressor configured today.
_COMPRESSORS: dict[str, tuple[bytes, Callable[[], tuple[Any, Any]]]] = {
    "zlib": (b"z", lambda: (zlib.compress, zlib.decompress)),
    "gzip": (b"g", lambda: (gzip.compress, gzip.decompress)),
    "lzma": (b"x", lambda: (lzma.compress, lzma.decompress)),
    "bz2": (b"b", lambda: (bz2.compress, bz2.decompress)),
    "zstd": (b"s", _zstd),
    "lz4": (b"4", _lz4),
}
_COMPRESSED = b"\x00rx"  # no serializer output starts with NUL: pickle 0x80, JSON text, ...
_PACKAGES = {"zstd": "zstandard", "lz4": "lz4"}


@functools.cache
def _decompressor(tag: bytes) -> Callable[[bytes], bytes]:
    for name, (known, load) in _COMPRESSORS.items():
        if known == tag:
            try:
                return load()[1]
            except ImportError:
                package = _PACKAGES[name]
                raise ImproperlyConfigured(
                    f"A cached value is compressed with {name}; install {package!r} to read it."
                ) from None
    raise ValueError(f"A cached value has an unknown compression tag {tag!r}.")


class _Codec:
    """Values to Redis and back: ints raw (INCR works), else serialize, then maybe compress.

    Raw ints and compressed values are recognised on read whatever the settings, so changing
    the serializer's compression, or turning it on, leaves entries already stored readable.
    """

    def __init__(self, serializer: Any, compressor: str | None, min_length: int) -> None:
        self.serializer = serializer
        self._dumps, self._loads = serializer.dumps, serializer.loads
        if type(serializer) is RedisSerializer:  # ints are handled here: call pickle directly
            self._dumps = functools.partial(pickle.dumps, protocol=serializer.protocol)
            self._loads = pickle.loads
        self._compress: Callable[[bytes], bytes] | None = None
        self._min_length = min_length
        if compressor is not None:
            tag, load = _COMPRESSORS[compressor]
            self._compress, self._header = load()[0], _COMPRESSED + tag

    def dumps(self, obj: Any) -> Any:
        if type(obj) is int:
            return obj
        data = self._dumps(obj)
        if self._compress is not None and len(data) >= self._min_length:
            return self._header + self._compress(data)
        return data

    def loads_many(self, values: list[bytes | None]) -> list[Any]:
        """``loads`` of each value, ``_MISSING`` for None; pickles decoded without a call."""
        loads, raw = self.loads, self._loads
        return [
            _MISSING if data is None else raw(data) if data[:1] == b"\x80" else loads(data)
            for data in values
        ]

    def loads(self, data: bytes) -> Any:
        first = data[:1]
        if first == b"\x80":  # a pickle, the usual case (or msgpack's empty map)
            return self._loads(data)
        if first == b"\x00" and data[:3] == _COMPRESSED:
            return self.loads(_decompressor(data[3:4])(data[4:]))
        if first and first in _INT_FIRST_BYTES:
            try:
                return int(data)
            except ValueError:
                pass
        return self._loads(data)


_INT_FIRST_BYTES = b"-0123456789"
_MISSING = object()


# ---------------------------------------------------------------------------
# Configuration: LOCATION and OPTIONS
# ---------------------------------------------------------------------------

# OPTIONS keys this module consumes itself, with their defaults; every other key goes to
# redis-py's pool.
_OWN_OPTIONS: dict[str, Any] = {
    "serializer": "pickle",
    "pool_class": None,
    "parser_class": None,
    "compressor": None,
    "compress_min_length": 256,
    "ignore_exceptions": False,
    "log_ignored_exceptions": True,
    "scan_count": 1000,
    "clear_by_prefix": False,
    "reverse_key_function": None,
    "stampede_protection": True,
    "stampede_lock_timeout": 10,
    "sentinels": None,
    "sentinel_kwargs": None,
    "sentinel_replica_reads": False,
    "cluster": False,
}

# Defaults that differ from redis-py's: past 100 connections, wait for a free one instead
# of failing, and never hang on a server that does not answer.
_DEFAULT_POOL_OPTIONS: dict[str, Any] = {
    "max_connections": 100,
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


def _host_port(address: str) -> tuple[str, int]:
    """``("host", port)`` from ``"host:port"`` or ``"redis://host:port/..."``."""
    parts = urlsplit(address if "//" in address else f"redis://{address}")
    if parts.hostname is None:
        raise ValueError(f"no host in {address!r}")
    return parts.hostname, parts.port or 6379


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


def _import(options: dict[str, Any], name: str) -> Any:
    """``options[name]``, imported if it is a dotted path, or an error naming the option."""
    value = options[name]
    if not isinstance(value, str):
        return value
    try:
        return import_string(value)
    except ImportError as error:
        raise ImproperlyConfigured(f"OPTIONS {name!r}: cannot import {value!r}: {error}") from None


def _checked(options: dict[str, Any], name: str, kind: type, minimum: float | None = None) -> Any:
    """``options[name]`` if it is a ``kind`` (and at least ``minimum``), or a clear error."""
    value: Any = options[name]
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or (kind is not bool and type(value) is bool):
        raise ImproperlyConfigured(f"OPTIONS {name!r} must be a {kind.__name__}, not {value!r}.")
    if minimum is not None and options[name] < minimum:
        raise ImproperlyConfigured(f"OPTIONS {name!r} must be at least {minimum}, not {value!r}.")
    return value


if TYPE_CHECKING:
    _SyncPool = redis.ConnectionPool
    _AsyncPool = redis.asyncio.ConnectionPool
else:
    _SyncPool = _AsyncPool = object


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


class _WaitForConnection(_SyncPool):
    """Mixed into redis-py's pools: as fast, but when every connection is busy, callers wait
    for one. ``redis.BlockingConnectionPool`` waits too, but costs a queue round trip on
    every call."""

    def __init__(self, *args: Any, timeout: float | None = 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._released = threading.Condition(threading.Lock())
        self._waiting = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_connection(*args, **kwargs)
        except redis.exceptions.MaxConnectionsError:
            return self._wait_for_connection(*args, **kwargs)

    def _wait_for_connection(self, *args: Any, **kwargs: Any) -> Any:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
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
            try:
                return super().get_connection(*args, **kwargs)
            except redis.exceptions.MaxConnectionsError:
                pass

    def _has_room(self) -> bool:
        return bool(self._created_connections < self.max_connections)

    def release(self, connection: Any) -> None:
        super().release(connection)
        if self._waiting:
            with self._released:
                self._released.notify()


class _AsyncWaitForConnection(_AsyncPool):
    """The asyncio twin of ``_WaitForConnection``: a pool per event loop, so futures suffice."""

    def __init__(self, *args: Any, timeout: float | None = 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except redis.exceptions.MaxConnectionsError:
            return await self._wait_for_connection(*args, **kwargs)

    async def _wait_for_connection(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        while True:
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
            with contextlib.suppress(redis.exceptions.MaxConnectionsError):
                return await super().get_connection(*args, **kwargs)

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _WaitingPool(_WaitForConnection, redis.ConnectionPool):
    """The default sync pool."""


class _AsyncWaitingPool(_AsyncWaitForConnection, redis.asyncio.ConnectionPool):
    """The default asyncio pool."""


class _WaitingSentinelPool(_WaitForConnection, redis.sentinel.SentinelConnectionPool):
    """The sync pool of a Sentinel-managed master or replica."""


class _AsyncWaitingSentinelPool(
    _AsyncWaitForConnection, redis.asyncio.sentinel.SentinelConnectionPool
):
    """The asyncio pool of a Sentinel-managed master or replica."""


def _pool_exhausted(pool: Any) -> str:
    return (
        f"No free Redis connection within {pool.timeout} s: all {pool.max_connections} "
        "of the pool are in use. Raise OPTIONS 'max_connections', or 'timeout' (the wait)."
    )


class _Config:
    """One cache alias's LOCATION and OPTIONS, checked once, ready to build pools from."""

    def __init__(self, servers: list[str], options: dict[str, Any]) -> None:
        self.servers = servers
        own = {**_OWN_OPTIONS, **{k: v for k, v in options.items() if k in _OWN_OPTIONS}}
        self.serializer = _Codec(
            self._serializer(own),
            self._compressor(own["compressor"]),
            _checked(own, "compress_min_length", int, minimum=0),
        )
        self.ignore_exceptions = _checked(own, "ignore_exceptions", bool)
        self.log_ignored_exceptions = _checked(own, "log_ignored_exceptions", bool)
        self.scan_count = _checked(own, "scan_count", int, minimum=1)
        self.clear_by_prefix = _checked(own, "clear_by_prefix", bool)
        reverse = _import(own, "reverse_key_function")
        if reverse is not None and not callable(reverse):
            raise ImproperlyConfigured("OPTIONS 'reverse_key_function' must be a callable.")
        self.reverse_key_function: Callable[[str], str] | None = reverse
        self.stampede_lock_timeout: float | None = None
        if _checked(own, "stampede_protection", bool):
            self.stampede_lock_timeout = _checked(
                own, "stampede_lock_timeout", float, minimum=0.001
            )

        pool_class = _import(own, "pool_class")
        parser_class = _import(own, "parser_class")
        self._topology(own, servers, pool_class)
        if not self.sentinels:
            self.sync_pool_class, self.async_pool_class = self._pool_classes(pool_class)
        redis_options = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        self._check_keys(redis_options)
        defaults = {**_DEFAULT_POOL_OPTIONS, "driver_info": _driver_info()}
        if self.cluster:  # redis-py's async cluster client cannot wait: keep its own limit
            defaults.pop("max_connections")
        self.sync_options = self._pool_options(self.sync_pool_class, defaults, redis_options)
        self.async_options = self._pool_options(self.async_pool_class, defaults, redis_options)
        retry = redis_options.get("retry")
        if type(retry) is redis.retry.Retry:
            # An asyncio connection silently ignores a sync Retry: give it the asyncio twin.
            self.async_options["retry"] = redis.asyncio.retry.Retry(
                retry._backoff,
                retry._retries,
                tuple(e for e in retry._supported_errors if issubclass(e, redis.RedisError)),
            )
        if parser_class is not None:
            self.sync_options["parser_class"] = self._parser(parser_class, sync=True)
            self.async_options["parser_class"] = self._parser(parser_class, sync=False)
            if "RESP2" in parser_class.__name__ and "protocol" not in options:
                # redis-py 8 speaks RESP3 unless told otherwise, which a RESP2 parser can't read.
                self.sync_options["protocol"] = self.async_options["protocol"] = 2
        # The pool key holds what the user set, so equal settings share a pool.
        self.frozen = _freeze((redis_options, parser_class, pool_class))

    def _topology(self, own: dict[str, Any], servers: list[str], pool_class: Any) -> None:
        """Sentinel, Cluster or plain servers: which ``servers`` index means which pool."""
        self.cluster = _checked(own, "cluster", bool)
        self.sentinels = self._sentinel_addresses(own["sentinels"])
        self.sentinel_kwargs = own["sentinel_kwargs"] or {}
        if not isinstance(self.sentinel_kwargs, dict):
            raise ImproperlyConfigured("OPTIONS 'sentinel_kwargs' must be a dict.")
        replica_reads = _checked(own, "sentinel_replica_reads", bool)
        if self.sentinels:
            if self.cluster or pool_class is not None or len(servers) != 1:
                raise ImproperlyConfigured(
                    "With OPTIONS 'sentinels', LOCATION is one URL naming the service, "
                    "redis://[:password@]service_name[/db], and neither 'cluster' nor "
                    "'pool_class' is set."
                )
            # Index 0: the master's pool; index 1: the replicas' pool, for reads.
            self.servers = servers * 2 if replica_reads else servers
            self.sync_pool_class, self.async_pool_class = (
                _WaitingSentinelPool,
                _AsyncWaitingSentinelPool,
            )
        elif self.cluster:
            # One cluster client routes every command; LOCATION lists its startup nodes.
            self.startup_nodes = [_host_port(url) for url in servers]
            self.servers = servers[:1]
            self._url_credentials()  # checks the URL now, not at the first call

    @staticmethod
    def _sentinel_addresses(value: Any) -> list[tuple[str, int]]:
        if value is None:
            return []
        try:
            addresses = [_host_port(v) if isinstance(v, str) else (v[0], int(v[1])) for v in value]
        except (TypeError, ValueError, IndexError):
            addresses = []
        if not addresses:
            raise ImproperlyConfigured(
                "OPTIONS 'sentinels' must list the sentinels as 'host:port' or (host, port), "
                f"not {value!r}."
            )
        return addresses

    @staticmethod
    def _serializer(own: dict[str, Any]) -> Any:
        value = own["serializer"]
        if isinstance(value, str) and value in _SERIALIZERS:
            value = _SERIALIZERS[value]
        else:
            value = _import(own, "serializer")
        if isinstance(value, type):
            try:
                value = value()
            except ImportError as error:
                raise ImproperlyConfigured(
                    f"OPTIONS 'serializer' {value.__name__} needs a package: {error}"
                ) from None
        if not (
            callable(getattr(value, "dumps", None)) and callable(getattr(value, "loads", None))
        ):
            raise ImproperlyConfigured(
                f"OPTIONS 'serializer' must be one of {', '.join(_SERIALIZERS)}, or a class, "
                f"instance or dotted path of one with dumps() and loads(), not {value!r}."
            )
        return value

    @staticmethod
    def _compressor(name: Any) -> str | None:
        if name is None:
            return None
        if name not in _COMPRESSORS:
            raise ImproperlyConfigured(
                f"OPTIONS 'compressor' must be one of {', '.join(_COMPRESSORS)}, not {name!r}."
            )
        try:
            _COMPRESSORS[name][1]()
        except ImportError:
            raise ImproperlyConfigured(
                f"OPTIONS 'compressor' {name!r} needs the {_PACKAGES[name]!r} package "
                f"(pip install django-redis-ex[{name}])."
            ) from None
        return str(name)

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
        if self.cluster:
            connection_classes += (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
        accepted = _accepted_arguments(
            self.sync_pool_class, self.async_pool_class, *connection_classes
        )
        unknown = sorted(set(redis_options) - accepted)
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown key(s) in the cache's OPTIONS: {', '.join(map(repr, unknown))}. "
                f"OPTIONS takes {', '.join(_OWN_OPTIONS)} and redis-py's "
                "connection pool arguments (max_connections, socket_timeout, db, ...)."
            )

    def pool_key(self, kind: str, index: int) -> tuple[Hashable, ...]:
        topology: tuple[Hashable, ...] = ()  # a plain server's pool: wherever it is listed
        if self.cluster or self.sentinels:
            topology = (self.cluster, tuple(self.sentinels), _freeze(self.sentinel_kwargs), index)
        return (kind, self.servers[index], self.frozen, topology)

    def make_sync_client(self, index: int) -> Any:
        if self.cluster:
            options = {k: v for k, v in self.sync_options.items() if k != "timeout"}
            # The node pools wait like ours; RedisCluster hands them no 'timeout' argument.
            wait = self.sync_options.get("timeout", _DEFAULT_POOL_OPTIONS["timeout"])
            node_pool = type(
                "_ClusterNodePool",
                (_WaitingPool,),
                {"__init__": functools.partialmethod(_WaitingPool.__init__, timeout=wait)},
            )
            # redis-py uses connection_pool_class only for a client made from a URL.
            others = [redis.cluster.ClusterNode(h, p) for h, p in self.startup_nodes[1:]]
            return _SharedCluster(
                url=self.servers[0],
                startup_nodes=others,
                connection_pool_class=node_pool,
                **options,
            )
        if self.sentinels:
            manager = redis.sentinel.Sentinel(self.sentinels, sentinel_kwargs=self.sentinel_kwargs)
            pool = self._sentinel_pool(self.sync_pool_class, manager, index, self.sync_options)
        else:
            pool = self.sync_pool_class.from_url(self.servers[index], **self.sync_options)
        return _SharedRedis(connection_pool=pool)

    def make_async_client(self, index: int) -> Any:
        if self.cluster:
            nodes = [
                redis.asyncio.cluster.ClusterNode(host, port) for host, port in self.startup_nodes
            ]
            options = {k: v for k, v in self.async_options.items() if k != "timeout"}
            return _SharedAsyncCluster(startup_nodes=nodes, **self._url_credentials(), **options)
        if self.sentinels:
            manager = redis.asyncio.sentinel.Sentinel(
                self.sentinels, sentinel_kwargs=self.sentinel_kwargs
            )
            pool = self._sentinel_pool(self.async_pool_class, manager, index, self.async_options)
        else:
            pool = self.async_pool_class.from_url(self.servers[index], **self.async_options)
        return _SharedAsyncRedis(connection_pool=pool)

    def _url_credentials(self) -> dict[str, Any]:
        """What the first URL of LOCATION says besides the host: password, db, TLS."""
        options = redis.connection.parse_url(self.servers[0])
        for name in ("host", "port", "path", "connection_class"):
            options.pop(name, None)
        if self.cluster:
            if options.pop("db", 0) not in (0, "0"):
                raise ImproperlyConfigured("Redis Cluster has only db 0: drop the /db of LOCATION.")
            if urlsplit(self.servers[0]).scheme == "rediss":
                options["ssl"] = True
        return options

    def _sentinel_pool(
        self, pool_class: Any, manager: Any, index: int, options: dict[str, Any]
    ) -> Any:
        service = urlsplit(self.servers[0]).hostname
        connection = {**options, **self._url_credentials()}
        return pool_class(service, manager, is_master=index == 0, **connection)


_NO_OPTIONS: dict[str, Any] = {}
_configs: dict[Hashable, tuple[dict[str, Any], _Config]] = {}


def _config_for(servers: list[str], options: dict[str, Any]) -> _Config:
    """The checked configuration, parsed once per settings dict rather than per request.

    Django builds a cache object per request from the same settings, so the OPTIONS dict is
    the same object each time; the entry holds it, so its id cannot be reused meanwhile.
    """
    key = (tuple(servers), id(options))
    entry = _configs.get(key)
    if entry is None or entry[0] is not options:
        if len(_configs) >= 64:  # settings that come and go (tests): start afresh
            _configs.clear()
        entry = _configs[key] = (options, _Config(servers, options))
    return entry[1]


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

    async def close_shared(self) -> None:
        await self.connection_pool.disconnect()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if manager is not None:  # a Sentinel pool: its connections to the sentinels too
            await manager.aclose()


# command: (RedisCluster method that splits it by slot, its arguments from the command's)
_CLUSTER_SPLIT: dict[str, tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]] = {
    "MGET": ("mget_nonatomic", lambda args: (list(args),)),
    "MSET": ("mset_nonatomic", lambda args: (dict(zip(args[::2], args[1::2], strict=True)),)),
    "DEL": ("delete", lambda args: args),
    "UNLINK": ("unlink", lambda args: args),
    "EXISTS": ("exists", lambda args: args),
}


class _ClusterCommands:
    """What a cluster client sends differently: multi-key commands split by slot (one round
    trip per node), and SCAN over every primary in turn behind one cursor."""

    @classmethod
    def split(cls, client: Any, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]] | None:
        """The splitting method and its arguments, if ``args`` spans slots."""
        how = _CLUSTER_SPLIT.get(args[0])
        if how is None:
            return None
        keys = args[1::2] if args[0] == "MSET" else args[1:]
        if len({client.keyslot(key) for key in keys}) < 2:
            return None
        return how[0], how[1](args[1:])

    @staticmethod
    def scan_target(client: Any, cursor: int) -> tuple[Any, int, int]:
        """The primary to scan, its own cursor, and how many primaries there are."""
        primaries = sorted(client.get_primaries(), key=lambda node: node.name)
        return primaries[cursor % len(primaries)], cursor // len(primaries), len(primaries)

    @staticmethod
    def scan_reply(reply: Any, cursor: int, count: int) -> tuple[int, list[Any]]:
        """The reply of one primary's SCAN, with the composite cursor of the next step."""
        node_cursor, keys = reply
        if isinstance(node_cursor, dict):
            (node_cursor,) = node_cursor.values()
        index = cursor % count
        if int(node_cursor) == 0:
            index, node_cursor = index + 1, 0
        return (0 if index == count else int(node_cursor) * count + index), keys


class _SharedCluster(redis.cluster.RedisCluster):
    """A sync cluster client that takes the commands the operations send; shared, so
    ``close()`` leaves it open (a closed RedisCluster fails later calls, redis-py #3846)."""

    def close(self) -> None:
        """Other cache objects use this client: it stays open for the process."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs:
            if args[0] == "SCAN":
                node, node_cursor, count = _ClusterCommands.scan_target(self, args[1])
                reply = super().execute_command("SCAN", node_cursor, *args[2:], target_nodes=node)
                return _ClusterCommands.scan_reply(reply, args[1], count)
            split = _ClusterCommands.split(self, args)
            if split is not None:
                return getattr(self, split[0])(*split[1])
        return super().execute_command(*args, **kwargs)


class _SharedAsyncCluster(redis.asyncio.cluster.RedisCluster):
    """The asyncio twin of ``_SharedCluster``; ``aclose()`` leaves the shared client open."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs:
            if args[0] == "SCAN":
                node, node_cursor, count = _ClusterCommands.scan_target(self, args[1])
                reply = await super().execute_command(
                    "SCAN", node_cursor, *args[2:], target_nodes=node
                )
                return _ClusterCommands.scan_reply(reply, args[1], count)
            split = _ClusterCommands.split(self, args)
            if split is not None:
                return await getattr(self, split[0])(*split[1])
        return await super().execute_command(*args, **kwargs)

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        """Other cache objects on this loop use this client: it is closed with the loop."""

    async def close_shared(self) -> None:
        await super().aclose()


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
                        await client.close_shared()
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
# An operation is a generator: it yields a command (a tuple of arguments), a pipeline (a list
# of such tuples) or a pause (``_Sleep``), receives the reply, and returns the method's
# result. The sync and the asyncio client run the same generators, so the two paths cannot
# drift apart. Each call of a cache method is one round trip unless said otherwise.


class _Sleep:
    """A pause inside an operation: ``time.sleep`` or ``asyncio.sleep``, by path."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Command = Union[tuple[Any, ...], list[tuple[Any, ...]], _Sleep]  # noqa: UP007 (3.10 runs it)
Operation = Generator[Command, Any, Any]

# Commands that may go to a replica; everything else goes to the first server.
_READ_COMMANDS = frozenset({"GET", "MGET", "EXISTS", "TTL", "PTTL"})
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
# Delete a lock only if it still holds our token.
_RELEASE_LOCK = _Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


class _KeyNotFound:
    """What a cache call returns when Redis is unavailable and errors are ignored: raise, as
    for a missing key (``incr``, ``incr_version``)."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def resolve(self) -> Any:
        raise ValueError(f"Key '{self.key}' not found.")


class _Computed:
    """A miss of ``get_or_set``: the default, computed."""

    def __init__(self, default: Any) -> None:
        self.default = default

    def resolve(self) -> Any:
        return self.default() if callable(self.default) else self.default


def _set_command(key: str, data: Any, timeout: int | None, *flags: str) -> tuple[Any, ...]:
    if timeout is None:
        return ("SET", key, data, *flags)
    return ("SET", key, data, "EX", timeout, *flags)


def _op_add(codec: _Codec, key: str, value: Any, timeout: int | None) -> Operation:
    data = codec.dumps(value)
    if timeout == 0:
        # Django's add(timeout=0) reports whether the key was free and leaves nothing behind.
        return (yield ("EXISTS", key)) == 0
    return bool((yield _set_command(key, data, timeout, "NX")))


def _op_get(codec: _Codec, key: str, default: Any) -> Operation:
    data = yield ("GET", key)
    return default if data is None else codec.loads(data)


def _op_set(
    codec: _Codec, key: str, value: Any, timeout: int | None, nx: bool, xx: bool
) -> Operation:
    """Django's set (returns None); with ``nx`` or ``xx``, whether the value was written."""
    data = codec.dumps(value)
    if timeout == 0:  # an instant expiry: nothing is stored
        if nx:
            return (yield ("EXISTS", key)) == 0
        existed = yield ("DEL", key)
        return bool(existed) if xx else None
    flags = ("NX",) if nx else ("XX",) if xx else ()
    written = yield _set_command(key, data, timeout, *flags)
    return bool(written) if flags else None


def _op_touch(key: str, timeout: int | None) -> Operation:
    if timeout is None:
        return bool((yield ("PERSIST", key)))
    return bool((yield ("EXPIRE", key, timeout)))


def _op_bool(*command: Any) -> Operation:
    """A command whose integer reply means yes or no (DEL, EXISTS, EXPIRE, PERSIST, ...)."""
    return bool((yield command))


def _op_get_many(codec: _Codec, key_map: dict[str, Any]) -> Operation:
    values = codec.loads_many((yield ("MGET", *key_map)))
    return {
        user_key: value
        for user_key, value in zip(key_map.values(), values, strict=True)
        if value is not _MISSING
    }


def _op_set_many(codec: _Codec, data: dict[str, Any], timeout: int | None) -> Operation:
    dumps = codec.dumps
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


def _op_incr(key: str, delta: int, create: bool) -> Operation:
    if create:
        return (yield ("INCRBY", key, delta))
    value = yield _INCR_EXISTING([key], [delta])
    if value is None:
        _KeyNotFound(key).resolve()
    return value


def _op_get_or_set(
    codec: _Codec, key: str, default: Any, timeout: int | None, lock_timeout: float | None
) -> Operation:
    """One GET on a hit. On a miss with a callable default and stampede protection on, one
    caller computes under a short lock while the others wait for its value (bounded by the
    lock's timeout) and compute it themselves if it does not come."""
    data = yield ("GET", key)
    if data is not None:
        return codec.loads(data)
    if timeout == 0 or lock_timeout is None or not callable(default):
        value = default() if callable(default) else default
        return (yield from _op_store_missing(codec, key, value, timeout))
    lock, token = key + "\x00lock", os.urandom(8).hex()
    # Lock, then look again: a caller that stored the value and let go since our GET wins.
    locked, data = yield [("SET", lock, token, "PX", int(lock_timeout * 1000), "NX"), ("GET", key)]
    if data is not None:
        if locked:
            yield _RELEASE_LOCK([lock], [token])
        return codec.loads(data)
    if locked:
        try:
            value = default()
        except Exception:
            yield _RELEASE_LOCK([lock], [token])
            raise
        value = yield from _op_store_missing(codec, key, value, timeout)
        yield _RELEASE_LOCK([lock], [token])
        return value
    deadline, pause = time.monotonic() + lock_timeout, 0.005
    while time.monotonic() < deadline:
        yield _Sleep(pause)
        data, locked = yield [("GET", key), ("EXISTS", lock)]
        if data is not None:
            return codec.loads(data)
        if not locked:  # the computing caller failed or gave up: compute here
            break
        pause = min(pause * 2, 0.1)
    return (yield from _op_store_missing(codec, key, default(), timeout))


def _op_store_missing(codec: _Codec, key: str, value: Any, timeout: int | None) -> Operation:
    if timeout == 0:
        return value
    current = yield _GET_OR_STORE([key], [codec.dumps(value), timeout or 0])
    # Another caller may have stored a value since the GET: theirs wins, as with add().
    return value if current is None else codec.loads(current)


def _op_move(old_key: str, new_key: str, user_key: Any, atomic: bool) -> Operation:
    """Move a value to another key, keeping its expiry: one atomic round trip, or on Redis
    Cluster (the keys lie in different slots, out of reach of one script) two."""
    if atomic:
        if not (yield _RENAME_EXISTING([old_key, new_key], [])):
            _KeyNotFound(user_key).resolve()
        return
    data, remaining = yield [("GET", old_key), ("PTTL", old_key)]
    if data is None:
        _KeyNotFound(user_key).resolve()
    expiry = ("PX", remaining) if remaining > 0 else ()
    yield [("SET", new_key, data, *expiry), ("DEL", old_key)]


def _op_clear() -> Operation:
    return bool((yield ("FLUSHDB",)))


def _op_ttl(command: str, key: str) -> Operation:
    """django-redis's convention: 0 for a missing key, None for one that never expires."""
    remaining = yield (command, key)
    if remaining == -2:
        return 0
    return None if remaining == -1 else remaining


def _op_scan(pattern: str, cursor: int, count: int) -> Operation:
    cursor, keys = yield ("SCAN", cursor, "MATCH", pattern, "COUNT", count)
    return int(cursor), keys


def _op_delete_pattern(pattern: str, count: int) -> Operation:
    """SCAN and UNLINK in batches (one round trip each), never KEYS; returns how many went."""
    cursor, deleted = 0, 0
    while True:
        cursor, keys = yield from _op_scan(pattern, cursor, count)
        if keys:
            deleted += yield ("UNLINK", *keys)
        if cursor == 0:
            return deleted


def _op_clear_prefix(pattern: str, count: int) -> Operation:
    yield from _op_delete_pattern(pattern, count)
    return True


# ---------------------------------------------------------------------------
# Clients: run operations on the shared pools
# ---------------------------------------------------------------------------

# Redis is down, unreachable or too slow: what ignore_exceptions covers. Wrong credentials
# are a configuration error and always raise.
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


class _Client:
    """What both clients share: Django's RedisCacheClient internals and server choice."""

    def __init__(self, config: _Config) -> None:
        self._config = config
        self._servers = config.servers
        self._serializer = config.serializer
        self._single = len(config.servers) == 1

    def _get_connection_pool_index(self, write: bool) -> int:
        # Write to the first server. Read from the others if there are more.
        if write or len(self._servers) == 1:
            return 0
        return random.randint(1, len(self._servers) - 1)

    def _pipeline_index(self, commands: list[tuple[Any, ...]]) -> int:
        return self._get_connection_pool_index(any(c[0] not in _READ_COMMANDS for c in commands))

    def _unavailable(self, operation: Operation, error: Exception, miss: Any) -> Any:
        """Raise ``error``, or with ignore_exceptions log it once and return the miss."""
        if not self._config.ignore_exceptions or isinstance(error, redis.AuthenticationError):
            raise error
        operation.close()
        if self._config.log_ignored_exceptions:
            name = getattr(operation, "__name__", "operation").removeprefix("_op_")
            logger.warning("Redis unavailable in %s, ignored: %s", name, error)
        if isinstance(miss, (_KeyNotFound, _Computed)):
            return miss.resolve()
        return miss


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

    def run(self, operation: Operation, miss: Any = None) -> Any:
        try:
            command = next(operation)
            while True:
                command = operation.send(self._send(command))
        except StopIteration as done:
            return done.value
        except _UNAVAILABLE as error:
            return self._unavailable(operation, error, miss)

    def _send(self, command: Command) -> Any:
        if type(command) is tuple:
            client = self._clients[0] if self._single else None
            if client is None:
                write = command[0] not in _READ_COMMANDS
                client = self._client_at(self._get_connection_pool_index(write))
            try:
                return client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                return client.execute_command("EVAL", _SCRIPTS[command[1]], *command[2:])
        if type(command) is list:
            pipeline = self._client_at(self._pipeline_index(command)).pipeline(transaction=False)
            for args in command:
                pipeline.execute_command(*args)
            return pipeline.execute()
        assert isinstance(command, _Sleep)
        time.sleep(command.seconds)
        return None


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

    async def run(self, operation: Operation, miss: Any = None) -> Any:
        try:
            command = next(operation)
            while True:
                command = operation.send(await self._send(command))
        except StopIteration as done:
            return done.value
        except _UNAVAILABLE as error:
            return self._unavailable(operation, error, miss)

    async def _send(self, command: Command) -> Any:
        if type(command) is tuple:
            write = command[0] not in _READ_COMMANDS
            client = self._client_at(0 if self._single else self._get_connection_pool_index(write))
            try:
                return await client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                return await client.execute_command("EVAL", _SCRIPTS[command[1]], *command[2:])
        if type(command) is list:
            pipeline = self._client_at(self._pipeline_index(command)).pipeline(transaction=False)
            for args in command:
                pipeline.execute_command(*args)
            return await pipeline.execute()
        assert isinstance(command, _Sleep)
        await asyncio.sleep(command.seconds)
        return None


# ---------------------------------------------------------------------------
# The cache classes: keys, versions and timeouts; no Redis commands
# ---------------------------------------------------------------------------

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
Planned = tuple[Operation, Any]  # an operation, and what it returns when errors are ignored


def _seconds(value: Any, unit: float = 1) -> int:
    """A duration (number or timedelta) as a whole number of ``unit`` seconds."""
    if isinstance(value, datetime.timedelta):
        return int(value.total_seconds() / unit)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"Expected a number or a timedelta, not {value!r}.")


def _timestamp(when: Any, unit: float = 1) -> int:
    """A moment (datetime or Unix time in ``unit`` seconds) as a whole number of units."""
    if isinstance(when, datetime.datetime):
        return int(when.timestamp() / unit)
    return _seconds(when)


class _RedisEXBase(BaseCache):
    """Django's cache API and django-redis's extras, each in a sync and a native async form.

    Each pair of twins builds its operation in one place (``_plan_*``) and differs only in
    the client that runs it.
    """

    _client_kind: str

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(params)
        if isinstance(server, str):
            self._servers = re.split("[;,]", server)
        else:
            self._servers = list(server)
        self._options = params.get("OPTIONS") or _NO_OPTIONS
        self._config = _config_for(self._servers, self._options)
        self._serializer = self._config.serializer
        cls = type(self)
        self._default_key_methods = (
            cls.make_and_validate_key is BaseCache.make_and_validate_key
            and cls.make_key is BaseCache.make_key
            and cls.validate_key is _RedisEXBase.validate_key
        )

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

    # Raw clients and locks --------------------------------------------------

    def get_client(self, key: Any = None, *, write: bool = True) -> redis.Redis:
        """A ``redis.Redis`` on the shared pool (the first server unless ``write=False``)."""
        return self._sync_client.get_client(key, write=write)

    def get_async_client(self, key: Any = None, *, write: bool = True) -> redis.asyncio.Redis:
        """A ``redis.asyncio.Redis`` on the running loop's shared pool."""
        return self._async_client.get_client(key, write=write)

    def lock(
        self,
        key: Any,
        version: int | None = None,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        thread_local: bool = True,
    ) -> Any:
        """redis-py's ``Lock`` on a cache key: ``with cache.lock("report"): ...``."""
        return self.get_client().lock(
            self._key(key, version),
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
            thread_local=thread_local,
        )

    def alock(
        self,
        key: Any,
        version: int | None = None,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        thread_local: bool = True,
    ) -> Any:
        """The asyncio ``Lock``, on the running loop: ``async with cache.alock("report"): ...``."""
        return self.get_async_client().lock(
            self._key(key, version),
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
            thread_local=thread_local,
        )

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

    @property
    def _default_keys(self) -> bool:
        """Whether keys are Django's defaults, so ``_key`` may make them without the calls.

        Read on every call: tests (Django's own among them) swap ``key_func`` on the fly.
        """
        return self.key_func is default_key_func and self._default_key_methods

    def _key(self, key: Any, version: int | None) -> str:
        """``make_and_validate_key``, inlined for the default key function (a hot path)."""
        if not self._default_keys:
            return self.make_and_validate_key(key, version=version)
        version = self.version if version is None else version
        redis_key = f"{self.key_prefix}:{version}:{key}"
        if (
            len(redis_key) > 250
            or not redis_key.isascii()
            or not redis_key.isprintable()
            or " " in redis_key
        ):
            super().validate_key(redis_key)  # warns as Django does
        return redis_key

    def _keys(self, keys: Iterable[Any], version: int | None) -> list[str]:
        """``_key`` of each key, in order, validated in one pass (get_many of 100 keys)."""
        if not self._default_keys:
            return [self.make_and_validate_key(key, version=version) for key in keys]
        head = f"{self.key_prefix}:{self.version if version is None else version}:"
        redis_keys = [f"{head}{key}" for key in keys]
        joined = "".join(redis_keys)
        if (
            not (joined.isascii() and joined.isprintable() and " " not in joined)
            or max(map(len, redis_keys), default=0) > 250
        ):
            for redis_key in redis_keys:
                self.validate_key(redis_key)  # warns for the keys at fault
        return redis_keys

    def _key_map(self, keys: Iterable[Any], version: int | None) -> dict[str, Any]:
        keys = list(keys)
        return dict(zip(self._keys(keys, version), keys, strict=True))

    def _pattern(self, pattern: str, version: Any) -> str:
        """A SCAN pattern for user keys matching ``pattern``, the prefix taken literally."""
        prefix = _GLOB_SPECIAL.sub(r"\\\1", self.key_prefix)
        return str(self.key_func(pattern, prefix, self.version if version is None else version))

    def _user_key(self, redis_key: bytes | str) -> str:
        key = redis_key.decode() if isinstance(redis_key, bytes) else redis_key
        if self._config.reverse_key_function is not None:
            return self._config.reverse_key_function(key)
        if self.key_func is default_key_func:
            return key.split(":", 2)[2]
        return key

    # The API: each method, its async twin, and the plan they share ----------

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return self._sync_client.run(*self._plan_add(key, value, timeout, version))

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return await self._async_client.run(*self._plan_add(key, value, timeout, version))

    def _plan_add(self, key: Any, value: Any, timeout: Any, version: int | None) -> Planned:
        timeout = self.get_backend_timeout(timeout)
        return _op_add(self._serializer, self._key(key, version), value, timeout), False

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._sync_client.run(*self._plan_get(key, default, version))

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return await self._async_client.run(*self._plan_get(key, default, version))

    def _plan_get(self, key: Any, default: Any, version: int | None) -> Planned:
        return _op_get(self._serializer, self._key(key, version), default), default

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> Any:
        """Django's set; with ``nx=True`` (only if missing) or ``xx=True`` (only if present),
        returns whether the value was written."""
        return self._sync_client.run(*self._plan_set(key, value, timeout, version, nx, xx))

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> Any:
        return await self._async_client.run(*self._plan_set(key, value, timeout, version, nx, xx))

    def _plan_set(
        self, key: Any, value: Any, timeout: Any, version: int | None, nx: bool, xx: bool
    ) -> Planned:
        if nx and xx:
            raise ValueError("set() takes nx=True or xx=True, not both.")
        timeout = self.get_backend_timeout(timeout)
        op = _op_set(self._serializer, self._key(key, version), value, timeout, nx, xx)
        return op, (False if nx or xx else None)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._sync_client.run(*self._plan_touch(key, timeout, version))

    async def atouch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return await self._async_client.run(*self._plan_touch(key, timeout, version))

    def _plan_touch(self, key: Any, timeout: Any, version: int | None) -> Planned:
        return _op_touch(self._key(key, version), self.get_backend_timeout(timeout)), False

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._sync_client.run(_op_bool("DEL", self._key(key, version)), False)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return await self._async_client.run(_op_bool("DEL", self._key(key, version)), False)

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        key_map = self._key_map(keys, version)
        if not key_map:
            return {}
        return self._sync_client.run(_op_get_many(self._serializer, key_map), {})

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        key_map = self._key_map(keys, version)
        if not key_map:
            return {}
        return await self._async_client.run(_op_get_many(self._serializer, key_map), {})

    def get_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        return self._sync_client.run(*self._plan_get_or_set(key, default, timeout, version))

    async def aget_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        return await self._async_client.run(*self._plan_get_or_set(key, default, timeout, version))

    def _plan_get_or_set(
        self, key: Any, default: Any, timeout: Any, version: int | None
    ) -> Planned:
        timeout = self.get_backend_timeout(timeout)
        lock_timeout = self._config.stampede_lock_timeout
        op = _op_get_or_set(
            self._serializer, self._key(key, version), default, timeout, lock_timeout
        )
        return op, _Computed(default)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._sync_client.run(_op_bool("EXISTS", self._key(key, version)), False)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return await self._async_client.run(_op_bool("EXISTS", self._key(key, version)), False)

    def incr(
        self, key: Any, delta: int = 1, version: int | None = None, ignore_key_check: bool = False
    ) -> int:
        """Django's incr; ``ignore_key_check=True`` creates a missing key (from 0) instead."""
        return self._sync_client.run(*self._plan_incr(key, delta, version, ignore_key_check))

    async def aincr(
        self, key: Any, delta: int = 1, version: int | None = None, ignore_key_check: bool = False
    ) -> int:
        return await self._async_client.run(*self._plan_incr(key, delta, version, ignore_key_check))

    def _plan_incr(self, key: Any, delta: int, version: int | None, create: bool) -> Planned:
        redis_key = self._key(key, version)
        return _op_incr(redis_key, delta, create), _KeyNotFound(redis_key)

    def decr(
        self, key: Any, delta: int = 1, version: int | None = None, ignore_key_check: bool = False
    ) -> int:
        return self.incr(key, -delta, version, ignore_key_check)

    async def adecr(
        self, key: Any, delta: int = 1, version: int | None = None, ignore_key_check: bool = False
    ) -> int:
        return await self.aincr(key, -delta, version, ignore_key_check)

    def set_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        if not data:
            return []
        return self._sync_client.run(*self._plan_set_many(data, timeout, version))

    async def aset_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        if not data:
            return []
        return await self._async_client.run(*self._plan_set_many(data, timeout, version))

    def _plan_set_many(self, data: dict[Any, Any], timeout: Any, version: int | None) -> Planned:
        redis_data = dict(zip(self._keys(data, version), data.values(), strict=True))
        op = _op_set_many(self._serializer, redis_data, self.get_backend_timeout(timeout))
        return op, list(data)  # with Redis unavailable, every key failed

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        redis_keys = self._keys(keys, version)
        if redis_keys:
            self._sync_client.run(_op_delete_many(redis_keys))

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        redis_keys = self._keys(keys, version)
        if redis_keys:
            await self._async_client.run(_op_delete_many(redis_keys))

    def incr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        version = self.version if version is None else version
        self._sync_client.run(*self._plan_move(key, delta, version))
        return version + delta

    async def aincr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        version = self.version if version is None else version
        await self._async_client.run(*self._plan_move(key, delta, version))
        return version + delta

    def _plan_move(self, key: Any, delta: int, version: int) -> Planned:
        old_key, new_key = self._key(key, version), self._key(key, version + delta)
        op = _op_move(old_key, new_key, key, atomic=not self._config.cluster)
        return op, _KeyNotFound(key)

    def decr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self.incr_version(key, -delta, version)

    async def adecr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self.aincr_version(key, -delta, version)

    def clear(self) -> bool:
        """FLUSHDB, as Django's; with OPTIONS ``clear_by_prefix``, only this cache's keys."""
        return self._sync_client.run(self._plan_clear(), False)

    async def aclear(self) -> bool:
        return await self._async_client.run(self._plan_clear(), False)

    def _plan_clear(self) -> Operation:
        if not self._config.clear_by_prefix:
            return _op_clear()
        prefix = _GLOB_SPECIAL.sub(r"\\\1", self.key_prefix)
        return _op_clear_prefix(str(self.key_func("*", prefix, "*")), self._config.scan_count)

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: the pools are shared by every cache object and outlive requests."""

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing to do, as ``close()``."""

    # Expiry (django-redis's names and return values) ------------------------

    def ttl(self, key: Any, version: int | None = None) -> int | None:
        """Seconds left: None if the key never expires, 0 if it does not exist."""
        return self._sync_client.run(_op_ttl("TTL", self._key(key, version)), 0)

    async def attl(self, key: Any, version: int | None = None) -> int | None:
        return await self._async_client.run(_op_ttl("TTL", self._key(key, version)), 0)

    def pttl(self, key: Any, version: int | None = None) -> int | None:
        """Milliseconds left: None if the key never expires, 0 if it does not exist."""
        return self._sync_client.run(_op_ttl("PTTL", self._key(key, version)), 0)

    async def apttl(self, key: Any, version: int | None = None) -> int | None:
        return await self._async_client.run(_op_ttl("PTTL", self._key(key, version)), 0)

    def expire(self, key: Any, timeout: Any, version: int | None = None) -> bool:
        """Expire in ``timeout`` seconds (a number or a timedelta); False if no such key."""
        return self._sync_client.run(
            self._plan_expiry("EXPIRE", key, _seconds(timeout), version), False
        )

    async def aexpire(self, key: Any, timeout: Any, version: int | None = None) -> bool:
        return await self._async_client.run(
            self._plan_expiry("EXPIRE", key, _seconds(timeout), version), False
        )

    def pexpire(self, key: Any, timeout: Any, version: int | None = None) -> bool:
        """Expire in ``timeout`` milliseconds (a number or a timedelta)."""
        return self._sync_client.run(
            self._plan_expiry("PEXPIRE", key, _seconds(timeout, 0.001), version), False
        )

    async def apexpire(self, key: Any, timeout: Any, version: int | None = None) -> bool:
        return await self._async_client.run(
            self._plan_expiry("PEXPIRE", key, _seconds(timeout, 0.001), version), False
        )

    def expire_at(self, key: Any, when: Any, version: int | None = None) -> bool:
        """Expire at ``when``: a datetime, or Unix time in seconds."""
        return self._sync_client.run(
            self._plan_expiry("EXPIREAT", key, _timestamp(when), version), False
        )

    async def aexpire_at(self, key: Any, when: Any, version: int | None = None) -> bool:
        return await self._async_client.run(
            self._plan_expiry("EXPIREAT", key, _timestamp(when), version), False
        )

    def pexpire_at(self, key: Any, when: Any, version: int | None = None) -> bool:
        """Expire at ``when``: a datetime, or Unix time in milliseconds."""
        return self._sync_client.run(
            self._plan_expiry("PEXPIREAT", key, _timestamp(when, 0.001), version), False
        )

    async def apexpire_at(self, key: Any, when: Any, version: int | None = None) -> bool:
        return await self._async_client.run(
            self._plan_expiry("PEXPIREAT", key, _timestamp(when, 0.001), version), False
        )

    def persist(self, key: Any, version: int | None = None) -> bool:
        """Remove the key's expiry; False if it has none or does not exist."""
        return self._sync_client.run(_op_bool("PERSIST", self._key(key, version)), False)

    async def apersist(self, key: Any, version: int | None = None) -> bool:
        return await self._async_client.run(_op_bool("PERSIST", self._key(key, version)), False)

    def _plan_expiry(self, command: str, key: Any, amount: int, version: int | None) -> Operation:
        return _op_bool(command, self._key(key, version), amount)

    # Keys by pattern (SCAN, never KEYS) --------------------------------------

    def iter_keys(
        self, search: str, itersize: int | None = None, version: int | None = None
    ) -> Iterator[str]:
        """The user keys matching the glob ``search``, lazily, ``itersize`` per SCAN."""
        pattern, count = self._pattern(search, version), itersize or self._config.scan_count
        cursor = 0
        while True:
            cursor, keys = self._sync_client.run(_op_scan(pattern, cursor, count), (0, []))
            yield from map(self._user_key, keys)
            if cursor == 0:
                return

    async def aiter_keys(
        self, search: str, itersize: int | None = None, version: int | None = None
    ) -> AsyncIterator[str]:
        pattern, count = self._pattern(search, version), itersize or self._config.scan_count
        cursor = 0
        while True:
            cursor, keys = await self._async_client.run(_op_scan(pattern, cursor, count), (0, []))
            for key in keys:
                yield self._user_key(key)
            if cursor == 0:
                return

    def keys(self, search: str, version: int | None = None) -> list[str]:
        return list(self.iter_keys(search, version=version))

    async def akeys(self, search: str, version: int | None = None) -> list[str]:
        return [key async for key in self.aiter_keys(search, version=version)]

    def delete_pattern(
        self, pattern: str, version: int | None = None, itersize: int | None = None
    ) -> int:
        """Delete the keys matching the glob ``pattern``; returns how many were deleted."""
        return self._sync_client.run(self._plan_delete_pattern(pattern, version, itersize), 0)

    async def adelete_pattern(
        self, pattern: str, version: int | None = None, itersize: int | None = None
    ) -> int:
        return await self._async_client.run(
            self._plan_delete_pattern(pattern, version, itersize), 0
        )

    def _plan_delete_pattern(
        self, pattern: str, version: int | None, itersize: int | None
    ) -> Operation:
        return _op_delete_pattern(
            self._pattern(pattern, version), itersize or self._config.scan_count
        )


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
