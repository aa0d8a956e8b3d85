"""Redis cache backends for Django with native sync and asyncio paths and shared pools.

``RedisEXCache`` (sync-first: WSGI, sessions) and ``AsyncRedisEXCache`` (asyncio-first: ASGI)
both offer Django's whole cache API, sync and async. Sync methods run on ``redis.Redis`` and
async methods on ``redis.asyncio.Redis``, without hopping threads or starting event loops.
Connection pools live in one process-wide registry (per event loop for asyncio), not on the
cache objects that Django creates per thread and per request (Django ticket #35651).

Data and settings are interchangeable with ``django.core.cache.backends.redis.RedisCache``.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import bz2
import collections
import contextlib
import copy
import datetime
import fnmatch
import functools
import gzip
import hashlib
import hmac
import inspect
import io
import json
import logging
import lzma
import math
import os
import pickle
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
import types
import weakref
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    NamedTuple,
    NoReturn,
    ParamSpec,
    TypeAlias,
    TypeGuard,
    TypeVar,
    Union,
    cast,
)
from urllib.parse import urlsplit, urlunsplit

import django
import django.middleware.cache
import redis
import redis._parsers
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.connection
import redis.crc
import redis.credentials
import redis.retry
import redis.sentinel
from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core import checks
from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, default_key_func
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.template.response import SimpleTemplateResponse
from django.utils.cache import get_cache_key, learn_cache_key
from django.utils.deprecation import MiddlewareMixin
from django.utils.functional import cached_property
from django.utils.module_loading import import_string

# What the module touches inside its dependencies beyond their documented API; a test
# (test_the_private_names_the_module_uses_exist) asserts each, so a release that renames one
# fails that test rather than a user's request.
# - redis-py: Retry._backoff, ._retries, ._supported_errors; redis._parsers (_RESP2Parser,
#   _RESP3Parser, _HiredisParser, their _Async twins); ConnectionPool._checkpid(), reset();
#   asyncio ConnectionPool._available_connections, ensure_connection() (overridden); asyncio
#   Connection._connect(), on_connect_check_health() (overridden), ._reader, ._writer,
#   ._parser.read_response() (error replies returned, not raised), ._host_error(); sync
#   Connection._parser.set_invalidation_push_handler(), .encoder, .pack_commands(),
#   .send_packed_command(), .read_response(push_request=), .can_read(timeout=);
#   Redis.response_callbacks; parse_url(); SentinelConnectionPool.sentinel_manager, .sentinels;
#   RedisCluster(connection_pool_class=). The sync direct path: ConnectionPool's
#   _available_connections, _in_use_connections, _lock, pid, owns_connection(); Connection
#   ._sock, .health_check_interval, .encoder.decode_responses, ._parser._buffer (SocketBuffer)
#   ._buffer (its BytesIO); AskError/MovedError .slot_id, .host, .port.
# - asyncio: _get_running_loop(); Task._log_destroy_pending; StreamReader.feed_data (wrapped),
#   ._buffer, ._maybe_resume_transport() (_quick_reply; redis-py's parsers' ._buffer too).
# - Django: the page-caching section's reliances, listed there (and asserted by a test).
# - OpenTelemetry: trace._TRACER_PROVIDER. debug-toolbar: WRAPPED_CACHE_METHODS,
#   CachePanel._store_call_info(), .initialized_caches(), utils.get_stack_trace(),
#   .get_template_info(), cache._djdt_panel. Sentry: METHODS_TO_INSTRUMENT,
#   has_span_streaming_enabled() (Sentry 2), sentry_sdk.traces, cache._sentry_patched.
_otel: Any
_otel_context: Any
try:  # OpenTelemetry's API, if installed: each call that goes to Redis is then a span
    from opentelemetry import context as _otel_context  # type: ignore[import-not-found, import-untyped, no-redef, unused-ignore]
    from opentelemetry import trace as _otel  # type: ignore[import-not-found, import-untyped, no-redef, unused-ignore]
except ImportError:  # not installed: nothing is traced
    _otel = _otel_context = None

__all__ = [
    "AsyncRedisEXCache",
    "CacheMiddleware",
    "FetchFromCacheMiddleware",
    "RedisEXCache",
    "RedisSerializer",
    "UpdateCacheMiddleware",
    "aget_cache_key",
    "aget_redis_connection",
    "alearn_cache_key",
    "cache_page",
    "close_client_caches",
    "get_cache_key",
    "get_redis_connection",
    "learn_cache_key",
]
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
        import msgpack  # type: ignore[import-not-found, import-untyped, unused-ignore]

        self._msgpack = msgpack

    def dumps(self, obj: Any) -> Any:  # bytes (msgpack is untyped)
        return self._msgpack.packb(obj, use_bin_type=True)

    def loads(self, data: bytes) -> Any:
        return self._msgpack.unpackb(data, raw=False)


_SERIALIZERS: dict[str, Callable[[], Any]] = {
    "pickle": RedisSerializer,
    "json": JSONSerializer,
    "msgpack": MsgPackSerializer,
}


def _zstd() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    import zstandard  # type: ignore[import-not-found, import-untyped, unused-ignore]

    return zstandard.ZstdCompressor().compress, zstandard.ZstdDecompressor().decompress


def _lz4() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    import lz4.frame  # type: ignore[import-not-found, import-untyped, unused-ignore]

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
                return cast(Callable[[bytes], bytes], load()[1])
            except ImportError:
                package = _PACKAGES[name]
                raise ImproperlyConfigured(
                    f"A cached value is compressed with {name}; install {package!r} to read it."
                ) from None
    raise ValueError(f"A cached value has an unknown compression tag {tag!r}.")


class _Codec:
    """Values to Redis and back: ints raw (INCR works), else serialize, then maybe compress.
    Raw ints and compressed values are recognised on read whatever the settings (entries stay
    readable when the compression changes); serialized data that reads as an int is tagged."""

    def __init__(self, serializer: Any, compressor: str | None, min_length: int) -> None:
        self.serializer = serializer
        self._dumps, self._loads = serializer.dumps, serializer.loads
        # What reads a pickle: pickle.loads itself for Django's format (one call less a value).
        self._unpickle = pickle.loads if type(serializer) is RedisSerializer else self._loads
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
        if data[:1] in _INT_FIRST_BYTES and data[:1] and _reads_as_int(data):
            # msgpack writes 50 (an IntEnum, say) as b"2": tagged, or it would read as 2.
            return _SERIALIZED + data
        return data

    def at(self, key: str | bytes, kind: bytes = b"v") -> _Codec:
        """This codec for the values of ``key`` (of a ``kind``: b"v" a cache value, b"s" a
        set member, b"z" a sorted set's, b"h" + field a hash field's): a signed codec binds
        them to it; others are the same for every key."""
        return self

    def zmember(self, obj: Any) -> Any:
        """A sorted set's member as stored: as django-redis stores it, an int serialized
        too (a set's members and a hash's values are ``dumps``, ints raw)."""
        if type(obj) is not int:
            return self.dumps(obj)
        if type(self.serializer) is RedisSerializer:
            data = pickle.dumps(obj, self.serializer.protocol)
        else:
            data = self._dumps(obj)
        return self._compressed(data)

    def _compressed(self, data: bytes) -> bytes:
        if self._compress is not None and len(data) >= self._min_length:
            return self._header + self._compress(data)
        return data

    def zlegacy(self, obj: Any) -> Any:
        """The form 2.0 stored a sorted set's member in, if another: an int raw."""
        return obj if type(obj) is int else None

    def loads_many(self, values: list[bytes | None], keys: list[str]) -> list[Any]:
        """``loads`` of each value (read at each of ``keys``), ``_MISSING`` for None;
        pickles decoded without a call."""
        loads, raw = self.loads, self._unpickle
        return [
            _MISSING if data is None else raw(data) if data[:1] == b"\x80" else loads(data)
            for data in values
        ]

    def _decode(self, data: bytes) -> Any:
        first = data[:1]
        if first == b"\x80":  # a pickle, the usual case (or msgpack's empty map)
            return self._loads(data)
        if first == b"\x00" and data[:3] == _COMPRESSED:
            if data[3:4] == _SERIALIZED[3:]:
                return self._loads(data[4:])
            return self._decode(_decompressor(data[3:4])(data[4:]))
        if first == b"\x00" and data[:3] == _TAGGED:
            if _tag_pairs(data) is _MALFORMED:  # never valid: read as absent, not decoded
                raise _Unchecked(_MISSING)
            value = self._decode(_untagged(data))
            if self.tags_checked:  # OPTIONS tags: the operation checked them
                return value
            raise _Unchecked(value)
        if first and first in _INT_FIRST_BYTES:
            try:
                return int(data)
            except ValueError:
                pass
        return self._loads(data)

    loads = _decode
    signed = False
    tags_checked = False  # OPTIONS tags: a tagged value is read only after its tags are

    @property
    def forged(self) -> int:
        """Values refused for their signature (a signed codec's count)."""
        return 0


class _Unchecked(Exception):
    """A tagged value read by a cache without OPTIONS tags: its operation checks its tags
    (a second round trip) before it serves ``value``. Free on the hot path: an exception
    costs nothing until one is raised."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _SignedCodec(_Codec):
    """OPTIONS ``sign_values``: every value but a raw int is stored behind an HMAC-SHA256 of
    its key and bytes, keyed as Django's ``salted_hmac`` from ``SECRET_KEY`` (and its
    fallbacks, so keys can rotate). A value is signed for its key (``at(key)``, the Redis key
    whole) and for what it is there (a cache value, a set member, a hash field's value):
    copied to another key, or from a set into a cache entry, it reads as forged. Without a
    valid signature it is never deserialized: a miss (``_MISSING``)."""

    signed = True

    def __init__(self, serializer: Any, compressor: str | None, min_length: int) -> None:
        super().__init__(serializer, compressor, min_length)
        secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())]
        if not secrets[0]:
            raise ImproperlyConfigured("OPTIONS 'sign_values' needs Django's SECRET_KEY.")
        # salted_hmac's key, sha256(salt + secret), and HMAC's two padded hashes of it, made
        # once: hmac.digest() would cost 1.6 us a value (OpenSSL fetches SHA-256 each time),
        # copies of the padded hashes cost 0.7 us.
        self.keys = [hashlib.sha256(_SIGNING_SALT + _bytes(s)).digest() for s in secrets]
        self.pads = [_hmac_pads(key) for key in self.keys]
        self.refused = 0  # values refused for their signature

    @property
    def forged(self) -> int:
        return self.refused

    def at(self, key: str | bytes, kind: bytes = b"v") -> _Bound:
        raw = key if type(key) is bytes else cast(str, key).encode("utf-8", "surrogatepass")
        return _Bound(self, b"%d:%s%d:%s" % (len(kind), kind, len(raw), raw))

    def dumps(self, obj: Any) -> Any:
        raise TypeError("A signed value is signed for its key: codec.at(key).dumps().")

    def loads(self, data: bytes) -> Any:
        raise TypeError("A signed value is read for its key: codec.at(key).loads().")

    def sign(self, binding: bytes, data: Any) -> Any:
        """``data`` (what the unsigned codec stores) signed for ``binding``."""
        if type(data) is int:  # INCR needs it raw; an int runs no code when read
            return data
        return _SIGNED + _hmac_sha256(self.pads[0], binding + data) + data

    def payload(self, binding: bytes, data: bytes) -> bytes | None:
        """What the unsigned codec stored, if ``data`` is signed for ``binding`` (or is a
        raw int); None (counted) if not."""
        if data[:3] == _SIGNED:
            mac, payload = data[3:35], data[35:]
            message = binding + payload
            for pads in self.pads:
                if hmac.compare_digest(mac, _hmac_sha256(pads, message)):
                    return payload
        elif data[:1] in _INT_FIRST_BYTES and data[:1] and _reads_as_int(data):
            return data
        self.refused += 1
        return None

    def loads_many(self, values: list[bytes | None], keys: list[str]) -> list[Any]:
        return [
            _MISSING if data is None else self.at(key).loads(data)
            for data, key in zip(values, keys, strict=True)
        ]


class _Bound(_Codec):
    """A signed codec for the values of one key and kind (``_SignedCodec.at``)."""

    signed = True

    def __init__(self, codec: _SignedCodec, binding: bytes) -> None:  # nothing of its own
        self.codec, self.binding = codec, binding

    @property
    def forged(self) -> int:
        return self.codec.refused

    def at(self, key: str | bytes, kind: bytes = b"v") -> _Bound:
        return self.codec.at(key, kind)

    def dumps(self, obj: Any) -> Any:
        return self.codec.sign(self.binding, _Codec.dumps(self.codec, obj))

    zmember = dumps  # signed: an int raw, as ever

    def zlegacy(self, obj: Any) -> Any:
        return None

    def sign(self, data: Any) -> Any:
        return self.codec.sign(self.binding, data)

    def payload(self, data: bytes) -> bytes | None:
        return self.codec.payload(self.binding, data)

    def loads(self, data: bytes) -> Any:
        payload = self.codec.payload(self.binding, data)
        return _MISSING if payload is None else self.codec._decode(payload)


class _DjangoRedisJSON:
    """django-redis's JSONSerializer: Django's encoder, with json's default separators."""

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, cls=DjangoJSONEncoder).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data.decode())


def _zstd_frames() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """zstd as django-redis's compressor (pyzstd, level 3) writes and reads it: frames with or
    without their size (zstandard's one-shot decompress needs the size)."""
    import zstandard  # type: ignore[import-not-found, import-untyped, unused-ignore]

    def decompress(data: bytes) -> bytes:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)  # type: ignore[no-any-return, unused-ignore]

    return zstandard.ZstdCompressor().compress, decompress


# django-redis 7's compressors: how to load (compress, decompress), and the length over which
# a value is compressed.
_DJANGO_REDIS_COMPRESSION: dict[str, tuple[Callable[[], tuple[Any, Any]], int]] = {
    "zlib": (lambda: (functools.partial(zlib.compress, level=6), zlib.decompress), 15),
    "gzip": (lambda: (gzip.compress, gzip.decompress), 15),
    "lzma": (lambda: (functools.partial(lzma.compress, preset=4), lzma.decompress), 100),
    "lz4": (_lz4, 15),
    "zstd": (_zstd_frames, 15),
}


class _DjangoRedisCodec(_Codec):
    """OPTIONS ``"format": "django-redis"``: django-redis 7's bytes. Ints (not bools) raw;
    anything else serialized, then compressed if longer than its compressor's minimum, with
    no header. Read as django-redis reads: an int if the bytes read as one; else decompressed
    if they decompress, then deserialized. Values in this module's own format are read too."""

    def __init__(self, serializer: Any, compressor: str | None, min_length: int) -> None:
        super().__init__(serializer, None, min_length)
        self._decompress: Callable[[bytes], bytes] | None = None
        if compressor is not None:
            load, self._min_length = _DJANGO_REDIS_COMPRESSION[compressor]
            self._compress, self._decompress = load()

    def dumps(self, obj: Any) -> Any:
        if type(obj) is int:
            return obj
        return self._compressed(self._dumps(obj))

    def _compressed(self, data: bytes) -> bytes:
        if self._compress is not None and len(data) > self._min_length:
            return self._compress(data)
        return data

    def _decode(self, data: bytes) -> Any:
        try:
            return int(data)
        except ValueError:
            pass
        if data[:3] == _COMPRESSED:  # this module's own format
            return _Codec._decode(self, data)
        if self._decompress is not None:
            with contextlib.suppress(Exception):  # not compressed (short), as django-redis
                data = self._decompress(data)
        return self._loads(data)

    loads = _decode


# Then 32 bytes of HMAC-SHA256 (of the key and kind, and the rest), then what the codec
# stores unsigned. (2.0's first format, b"\x00rs", signed the bytes alone: read as forged.)
_SIGNED = b"\x00rk"
_SIGNING_SALT = b"django_redis_ex.sign_values"
_forged_keys: set[str] = set()


def _hmac_pads(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256's inner and outer hashes of ``key`` (RFC 2104), to be copied per message."""
    block = key.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
    return inner, outer


def _hmac_sha256(pads: tuple[Any, Any], message: bytes) -> bytes:
    inner, outer = pads[0].copy(), pads[1].copy()
    inner.update(message)
    outer.update(inner.digest())
    return cast(bytes, outer.digest())


def _bytes(secret: str | bytes) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode()


def _forged(key: Any) -> None:
    """Log, once per key (up to 10,000 keys), a value refused for its signature."""
    if key not in _forged_keys and len(_forged_keys) < 10_000:
        _forged_keys.add(key)
        logger.warning(
            "The value of %r has no valid signature (OPTIONS sign_values): read as a miss, "
            "not deserialized.",
            key,
        )


_INT_FIRST_BYTES = b"-0123456789"
_SERIALIZED = _COMPRESSED + b"="  # a serializer's output that is not compressed


def _reads_as_int(data: bytes) -> bool:
    try:
        int(data)
    except ValueError:
        return False
    return True


_MISSING = object()

# A tagged entry (OPTIONS "tags"): b"\x00rt", the header's length and a newline, the header
# (each tag's Redis key and the token it held when the entry was written, each as
# b"<length>:<bytes>"), then what the codec stores untagged; signed whole (sign_values). It
# is valid while each tag's key holds its token: a script checks that on the server.
_TAGGED = b"\x00rt"


def _untagged(envelope: bytes) -> bytes:
    """What a tagged entry holds after its header (``_tag_pairs`` found it well formed)."""
    line = envelope.index(b"\n", 3)
    return envelope[line + 1 + int(envelope[3:line]) :]


_MALFORMED = [(b"", b"\x00malformed")]  # a header that cannot be read: never valid


def _tag_pairs(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """The (tag key, token) pairs of a tagged entry (signed or not); None if untagged. A
    header that is not well formed (written by another client: lengths must be decimal
    digits, within the header) has pairs no tag holds: the entry reads as absent."""
    at = 35 if data[:3] == _SIGNED else 0
    if data[at : at + 3] != _TAGGED:
        return None
    line = data.find(b"\n", at + 3)
    size = data[at + 3 : line]
    if line < 0 or not size.isdigit() or line + int(size) >= len(data) - 1:
        return _MALFORMED
    at, stop, pairs = line + 1, line + 1 + int(size), []
    while at < stop:
        pair = []
        for _ in range(2):
            colon = data.find(b":", at, stop)
            length = data[at:colon]
            if colon < 0 or not length.isdigit() or colon + 1 + int(length) > stop:
                return _MALFORMED
            at = colon + 1 + int(length)  # always forward: past the colon
            pair.append(data[colon + 1 : at])
        pairs.append((pair[0], pair[1]))
    return pairs


def _tags_header(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(b"%d:%s%d:%s" % (len(k), k, len(t), t) for k, t in pairs)
    return _TAGGED + b"%d\n" % len(body) + body


# ---------------------------------------------------------------------------
# Configuration: OPTIONS, checked once
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
    "multiplex": True,
    "client_cache": False,
    "circuit_breaker": True,  # with ignore_exceptions only
    "credentials_over_plain_tcp": False,  # a credential_provider's secrets, without TLS
    "sign_values": False,
    "format": "django",  # or "django-redis": its serializers' and compressors' bytes
    "pickle_protocol": None,  # pickle's default, as django-redis
    "logger": None,  # the logger of ignored errors: "django_redis_ex"
    "tags": False,  # set(..., tags=[...]) and invalidate_tags(); reads check tags
}

# django-redis 7's names, so that its CACHES entry works with only BACKEND changed: each OPTIONS
# key means the same here (ours given), or is refused with what to write instead. Translated
# once per settings dict (the configuration is), and logged once.
_DJANGO_REDIS_SAME = {
    "IGNORE_EXCEPTIONS": "ignore_exceptions",
    "LOG_IGNORED_EXCEPTIONS": "log_ignored_exceptions",
    "SOCKET_TIMEOUT": "socket_timeout",
    "SOCKET_CONNECT_TIMEOUT": "socket_connect_timeout",
    "CONNECTION_POOL_CLASS": "pool_class",
    "PASSWORD": "password",
    "PARSER_CLASS": "parser_class",
    "SENTINELS": "sentinels",
    "SENTINEL_KWARGS": "sentinel_kwargs",
}
_DJANGO_REDIS_SETTINGS = {  # Django settings: the defaults of these OPTIONS
    "DJANGO_REDIS_IGNORE_EXCEPTIONS": "ignore_exceptions",
    "DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS": "log_ignored_exceptions",
    "DJANGO_REDIS_SCAN_ITERSIZE": "scan_count",
    "DJANGO_REDIS_LOGGER": "logger",
}
_HERD = (
    "django-redis's HerdClient is not supported: its packed entries are not read here. Drop "
    "CLIENT_CLASS: get_or_set's stampede protection (OPTIONS 'stampede_protection', on by "
    "default) lets one caller compute a missing value while the others wait for it."
)
_SHARD = (
    "django-redis's ShardClient (keys spread over servers by the client) is not supported: "
    "use Redis Cluster, which shards on the server side and moves slots without losing keys "
    "(OPTIONS 'cluster': True, LOCATION one or more of its nodes)."
)
_DJANGO_REDIS_CLIENTS = {
    "django_redis.client.DefaultClient": None,
    "django_redis.client.default.DefaultClient": None,
    "django_redis.client.SentinelClient": None,
    "django_redis.client.sentinel.SentinelClient": None,
    "django_redis.client.HerdClient": _HERD,
    "django_redis.client.herd.HerdClient": _HERD,
    "django_redis.client.ShardClient": _SHARD,
    "django_redis.client.sharded.ShardClient": _SHARD,
}
_DJANGO_REDIS_FACTORIES = {  # CONNECTION_FACTORY: these need nothing here
    "django_redis.pool.ConnectionFactory",
    "django_redis.pool.SentinelConnectionFactory",
}
_REDIS_CLIENTS = {"redis.Redis", "redis.client.Redis", "redis.StrictRedis"}
_DJANGO_REDIS_SERIALIZERS = {
    "django_redis.serializers.pickle.PickleSerializer": "pickle",
    "django_redis.serializers.json.JSONSerializer": "json",
    "django_redis.serializers.msgpack.MSGPackSerializer": "msgpack",
}
_DJANGO_REDIS_COMPRESSORS = {
    "django_redis.compressors.identity.IdentityCompressor": None,
    "django_redis.compressors.zlib.ZlibCompressor": "zlib",
    "django_redis.compressors.gzip.GzipCompressor": "gzip",
    "django_redis.compressors.lzma.LzmaCompressor": "lzma",
    "django_redis.compressors.lz4.Lz4Compressor": "lz4",
    "django_redis.compressors.zstd.ZStdCompressor": "zstd",
}


def _dotted(value: Any) -> Any:
    """A class's dotted path (django-redis's names may be given as classes too)."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def _refused(name: str, why: str) -> ImproperlyConfigured:
    where = "The setting" if name.startswith("DJANGO_REDIS_") else "OPTIONS"
    return ImproperlyConfigured(f"{where} {name!r} (django-redis's): {why}")


def _same(ours: str) -> Callable[[str, Any], list[tuple[str, Any]]]:
    return lambda name, value: [(ours, value)]


def _kwargs(name: str, value: Any) -> list[tuple[str, Any]]:
    if not isinstance(value, dict):
        raise _refused(name, f"must be a dict, not {value!r}.")
    return list(value.items())


def _client_class(name: str, value: Any) -> list[tuple[str, Any]]:
    if _dotted(value) not in _DJANGO_REDIS_CLIENTS:
        raise _refused(name, f"{value!r} is not one of django-redis's clients.")
    if (why := _DJANGO_REDIS_CLIENTS[_dotted(value)]) is not None:
        raise _refused(name, why)
    return []


def _only(accepted: set[str], why: str) -> Callable[[str, Any], list[tuple[str, Any]]]:
    """A django-redis option that needs nothing here when it names one of ``accepted``;
    any other value is refused, saying ``why``."""

    def check(name: str, value: Any) -> list[tuple[str, Any]]:
        if _dotted(value) not in accepted:
            raise _refused(name, f"{value!r}: {why}")
        return []

    return check


def _serializer_name(name: str, value: Any) -> list[tuple[str, Any]]:
    if _dotted(value) not in _DJANGO_REDIS_SERIALIZERS:
        raise _refused(
            name,
            f"{value!r} is not one of django-redis's serializers: set OPTIONS 'serializer' "
            "to a class or dotted path with dumps() and loads().",
        )
    return [("serializer", _DJANGO_REDIS_SERIALIZERS[_dotted(value)]), ("format", "django-redis")]


def _compressor_name(name: str, value: Any) -> list[tuple[str, Any]]:
    if _dotted(value) not in _DJANGO_REDIS_COMPRESSORS:
        raise _refused(name, f"{value!r} is not one of django-redis's compressors.")
    return [("compressor", _DJANGO_REDIS_COMPRESSORS[_dotted(value)]), ("format", "django-redis")]


# Each of django-redis 7's OPTIONS: the (our name, value) pairs it means here, or a refusal.
# (CLIENT_KWARGS: django-redis 7 reads it nowhere; nor does this.)
_DJANGO_REDIS_OPTIONS: dict[str, Callable[[str, Any], list[tuple[str, Any]]]] = {
    **{name: _same(ours) for name, ours in _DJANGO_REDIS_SAME.items()},
    "CONNECTION_POOL_KWARGS": _kwargs,
    "REDIS_CLIENT_KWARGS": _kwargs,
    "CLIENT_CLASS": _client_class,
    "CLIENT_KWARGS": lambda name, value: [],
    "REDIS_CLIENT_CLASS": _only(
        _REDIS_CLIENTS,
        "the clients are this module's own, on redis-py's pools; for a connection or pool "
        "class of your own, set OPTIONS 'connection_class' or 'pool_class'.",
    ),
    "CONNECTION_FACTORY": _only(
        _DJANGO_REDIS_FACTORIES,
        "pools are shared process-wide here; for a pool class of your own, set OPTIONS "
        "'pool_class'.",
    ),
    "SERIALIZER": _serializer_name,
    "PICKLE_VERSION": _same("pickle_protocol"),
    "COMPRESSOR": _compressor_name,
}


def _django_redis_settings() -> list[str]:
    """The ``DJANGO_REDIS_*`` settings that give OPTIONS defaults; the others refused."""
    from django.conf import settings

    if getattr(settings, "DJANGO_REDIS_CLOSE_CONNECTION", False):
        raise ImproperlyConfigured(
            "DJANGO_REDIS_CLOSE_CONNECTION (django-redis's) is not supported: connections go "
            "back to the process's shared pool after each call, so there is nothing to close "
            "when a request ends. Remove the setting."
        )
    factory = getattr(settings, "DJANGO_REDIS_CONNECTION_FACTORY", None)
    if factory is not None:  # the setting of OPTIONS CONNECTION_FACTORY's default
        _DJANGO_REDIS_OPTIONS["CONNECTION_FACTORY"]("DJANGO_REDIS_CONNECTION_FACTORY", factory)
    return [name for name in _DJANGO_REDIS_SETTINGS if hasattr(settings, name)]


def _from_django_redis(options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``options`` with django-redis's names (and its ``DJANGO_REDIS_*`` settings) as ours,
    and the names translated; refused, with what to write instead, where they cannot mean
    the same here."""
    from django.conf import settings

    names = [name for name in options if name.isupper()]
    defaults = _django_redis_settings()
    if not names and not defaults:
        return options, []
    ours = {k: v for k, v in options.items() if not k.isupper()}
    for name in names:
        translate = _DJANGO_REDIS_OPTIONS.get(name)
        if translate is None:
            raise ImproperlyConfigured(
                f"Unknown key {name!r} in the cache's OPTIONS: neither this module's (lower "
                "case) nor one of django-redis 7's."
            )
        for key, value in translate(name, options[name]):
            if key in ours and ours[key] != value:
                raise _refused(name, f"OPTIONS {key!r} is set too, to another value: keep one.")
            ours[key] = value
    for name in defaults:
        ours.setdefault(_DJANGO_REDIS_SETTINGS[name], getattr(settings, name))
    return ours, names + defaults


# OPTIONS "client_cache" settings: the local store's bounds, and the heartbeat of its
# tracking connection (entries are served for at most two intervals past the last answer).
_CLIENT_CACHE_DEFAULTS: dict[str, Any] = {
    "max_entries": 10_000,
    "max_bytes": 64 * 1024 * 1024,
    "heartbeat_interval": 0.25,
}
_CLIENT_CACHE_KINDS: dict[str, tuple[type, float]] = {
    "max_entries": (int, 1),
    "max_bytes": (int, 1024),
    "heartbeat_interval": (float, 0.01),
}

# OPTIONS "circuit_breaker" settings: after ``failures`` unavailability errors in a row, calls
# skip Redis for ``cool_down`` seconds, then one call tries it.
_CIRCUIT_BREAKER_DEFAULTS: dict[str, Any] = {"failures": 3, "cool_down": 5.0}
_CIRCUIT_BREAKER_KINDS: dict[str, tuple[type, float]] = {
    "failures": (int, 1),
    "cool_down": (float, 0.01),
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
    """``url`` with its password replaced by ``***``: in the user part, even with an
    unencoded ``/``, ``#`` or ``@`` in it, and in a ``password=`` query parameter."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, rest = rest.rpartition("@")  # the last '@': a password may hold '?' or '#'
    head, question, query = rest.partition("?")
    if at:
        user, colon, _password = userinfo.partition(":")
        head = f"{user}:***@{head}" if colon else f"{userinfo}@{head}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}{separator}{head}{question}{query}"


def _host_port(address: str) -> tuple[str, int]:
    """``("host", port)`` from ``"host:port"`` or ``"redis://host:port/..."``."""
    try:
        parts = urlsplit(address if "//" in address else f"redis://{address}")
        host, port = parts.hostname, parts.port or 6379
    except ValueError:  # a port that is no number: an unencoded ':' or '#' in a password?
        host = None
    if host is None:
        raise ImproperlyConfigured(f"No host and port in {_redact(address)!r}.")
    return host, port


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
    return cast(Hashable, value)


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


@functools.cache
def _driver_info() -> Any:
    """The CLIENT SETINFO name Django's own backend sends, so servers see the same client."""
    version = django.get_version()
    if hasattr(redis, "DriverInfo"):
        return redis.DriverInfo().add_upstream_driver("django", version)
    return None


class _Config:
    """A cache's OPTIONS, checked once: this module's own, and those for redis-py's pools.
    ``topology``: the kind of deployment they describe (``sentinels``, ``cluster`` or neither)."""

    def __init__(self, options: dict[str, Any], prefix: str | None = None) -> None:
        options, translated = _from_django_redis(options)
        if translated:
            logger.info(
                "Cache OPTIONS: django-redis's %s translated to this module's names (see the "
                "README's migration table).",
                ", ".join(translated),
            )
        self.options = _freeze(options)  # all of them, for what is kept per configuration
        own = {**_OWN_OPTIONS, **{k: v for k, v in options.items() if k in _OWN_OPTIONS}}
        self._values(own)
        self._failures(own, "circuit_breaker" in options)
        pool_class = self._deployment(own)
        # The shells send commands on pooled connections themselves, without redis-py's
        # per-command machinery, unless redis-py's own retry policy is asked for (on a
        # cluster, redis-py's RedisCluster then routes each command).
        retries = {"retry", "retry_on_error", "retry_on_timeout"} & set(options)
        self.direct = not retries
        self.multiplex: bool = _checked(own, "multiplex", bool) and self.direct
        cluster = self.topology is _Cluster and not self.direct
        self.client_cache = self._client_cache(own["client_cache"], cluster)
        redis_options = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        parser_class = self._pools(own, redis_options)
        # The pool key holds what the user set, so equal settings share a pool; a client-side
        # store's pools are its own: its connections redirect their invalidations to it.
        self.frozen = _freeze((redis_options, parser_class, pool_class))
        if self.client_cache is not None:
            store = (prefix, self.codec_key, _freeze(self.client_cache))
            self.frozen = _freeze((self.frozen, "client_cache", store))

    def _values(self, own: dict[str, Any]) -> None:
        """How values and keys are stored and found: the codec, scans, stampede locks."""
        codec_class = _SignedCodec if _checked(own, "sign_values", bool) else _Codec
        if own["format"] not in ("django", "django-redis"):
            raise ImproperlyConfigured(
                f"OPTIONS 'format' must be 'django' or 'django-redis', not {own['format']!r}."
            )
        django_redis = own["format"] == "django-redis"
        if django_redis:
            if codec_class is _SignedCodec:
                raise ImproperlyConfigured(
                    "OPTIONS 'sign_values' writes this module's format only: django-redis "
                    "could not read signed values. Drop 'format' (or django-redis's "
                    "SERIALIZER and COMPRESSOR) to sign."
                )
            if own["compressor"] not in (None, *_DJANGO_REDIS_COMPRESSION):
                raise ImproperlyConfigured(
                    f"OPTIONS 'compressor' {own['compressor']!r} has no django-redis "
                    f"counterpart: with 'format': 'django-redis', use one of "
                    f"{', '.join(_DJANGO_REDIS_COMPRESSION)}."
                )
            codec_class = _DjangoRedisCodec
        self.codec = codec_class(
            self._serializer(own, django_redis),
            self._compressor(own["compressor"]),
            _checked(own, "compress_min_length", int, minimum=0),
        )
        names = ("serializer", "compressor", "compress_min_length", "sign_values", "format")
        self.codec_key = _freeze((*(own[name] for name in names), own["pickle_protocol"]))
        self.tags: bool = _checked(own, "tags", bool)
        self.codec.tags_checked = self.tags
        if self.tags and django_redis:
            raise ImproperlyConfigured(
                "OPTIONS 'tags' writes this module's format only: django-redis could not read "
                "tagged entries. Drop 'format' (or django-redis's SERIALIZER and COMPRESSOR)."
            )
        self.scan_count: int = _checked(own, "scan_count", int, minimum=1)
        self.clear_by_prefix: bool = _checked(own, "clear_by_prefix", bool)
        reverse = _import(own, "reverse_key_function")
        if reverse is not None and not callable(reverse):
            raise ImproperlyConfigured("OPTIONS 'reverse_key_function' must be a callable.")
        self.reverse_key_function: Callable[[str], str] | None = reverse
        self.stampede_lock_timeout: float | None = None
        if _checked(own, "stampede_protection", bool):
            self.stampede_lock_timeout = _checked(
                own, "stampede_lock_timeout", float, minimum=0.001
            )

    def _failures(self, own: dict[str, Any], breaker_set: bool) -> None:
        """What happens when Redis is unavailable: ignore_exceptions and the circuit breaker."""
        self.ignore_exceptions: bool = _checked(own, "ignore_exceptions", bool)
        self.log_ignored_exceptions: bool = _checked(own, "log_ignored_exceptions", bool)
        name = own["logger"]
        if name is not None and not isinstance(name, str):
            raise ImproperlyConfigured(f"OPTIONS 'logger' must be a logger's name, not {name!r}.")
        self.logger = logger if name is None else logging.getLogger(name)
        breaker = own["circuit_breaker"]
        self.circuit_breaker = self._settings(
            "circuit_breaker", breaker, _CIRCUIT_BREAKER_DEFAULTS, _CIRCUIT_BREAKER_KINDS
        )
        if not self.ignore_exceptions:
            if self.circuit_breaker is not None and breaker_set:
                raise ImproperlyConfigured(
                    "OPTIONS 'circuit_breaker' works with 'ignore_exceptions': True only (it "
                    "makes calls return their ignored-error results at once)."
                )
            self.circuit_breaker = None

    def _deployment(self, own: dict[str, Any]) -> Any:
        """Sentinel, Cluster or servers: the topology and its pool classes; the pool_class."""
        self.sentinels = self._sentinel_addresses(own["sentinels"])
        self.sentinel_kwargs: dict[str, Any] = own["sentinel_kwargs"] or {}
        if not isinstance(self.sentinel_kwargs, dict):
            raise ImproperlyConfigured("OPTIONS 'sentinel_kwargs' must be a dict.")
        self.sentinel_replica_reads: bool = _checked(own, "sentinel_replica_reads", bool)
        cluster = _checked(own, "cluster", bool)
        pool_class = _import(own, "pool_class")
        if self.sentinels and (cluster or pool_class is not None):
            raise ImproperlyConfigured(
                "OPTIONS 'sentinels' takes neither 'cluster' nor 'pool_class': the Sentinel "
                "pools find the master themselves."
            )
        self.topology: type[_Topology] = (
            _Sentinel if self.sentinels else _Cluster if cluster else _Servers
        )
        self.sync_pool_class, self.async_pool_class = self.topology.pool_classes(pool_class)
        return pool_class

    def _pools(self, own: dict[str, Any], redis_options: dict[str, Any]) -> Any:
        """The arguments of redis-py's pools on both paths; the parser_class."""
        self._check_keys(redis_options)
        self.credential_provider = self._credential_provider(redis_options)
        self.plain_tcp_credentials = _checked(own, "credentials_over_plain_tcp", bool)
        if self.credential_provider is not None:
            redis_options["credential_provider"] = self.credential_provider
        defaults = {**_DEFAULT_POOL_OPTIONS, "driver_info": _driver_info()}
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
        parser_class = _import(own, "parser_class")
        if parser_class is not None:
            self.sync_options["parser_class"] = self._parser(parser_class, sync=True)
            self.async_options["parser_class"] = self._parser(parser_class, sync=False)
            if "RESP2" in parser_class.__name__ and "protocol" not in redis_options:
                # redis-py 8 speaks RESP3 unless told otherwise, which a RESP2 parser can't read.
                self.sync_options["protocol"] = self.async_options["protocol"] = 2
        return parser_class

    @staticmethod
    def _credential_provider(redis_options: dict[str, Any]) -> Any:
        """OPTIONS ``credential_provider``: a redis-py ``CredentialProvider``, or the dotted
        path of one (an instance, or a class made with no arguments); None if not set."""
        provider = redis_options.get("credential_provider")
        if provider is None:
            return None
        if isinstance(provider, str):
            try:
                provider = import_string(provider)
            except ImportError as error:
                raise ImproperlyConfigured(
                    f"OPTIONS 'credential_provider' {provider!r} cannot be imported: {error}"
                ) from None
            if isinstance(provider, type):
                provider = provider()
        if not callable(getattr(provider, "get_credentials", None)):
            raise ImproperlyConfigured(
                "OPTIONS 'credential_provider' must be a redis.credentials.CredentialProvider "
                f"(with get_credentials()), or its dotted path, not {provider!r}."
            )
        if "username" in redis_options or "password" in redis_options:
            raise ImproperlyConfigured(
                "OPTIONS 'credential_provider' gives the credentials: drop OPTIONS "
                "'username' and 'password'."
            )
        return provider

    def check_credentials(self, servers: list[str]) -> None:
        """A credential provider's secrets (tokens are bearer secrets) go over TLS or a Unix
        socket only, unless OPTIONS ``credentials_over_plain_tcp`` allows plain TCP."""
        if self.credential_provider is None:
            return
        for url in servers:
            parts = urlsplit(url)
            if parts.username or parts.password:
                raise ImproperlyConfigured(
                    "OPTIONS 'credential_provider' gives the credentials: drop the user and "
                    f"password from LOCATION {_redact(url)!r}."
                )
            tls = parts.scheme == "rediss" or bool(self.sync_options.get("ssl"))
            if not (tls or parts.scheme == "unix" or self.plain_tcp_credentials):
                raise ImproperlyConfigured(
                    f"OPTIONS 'credential_provider' would send its credentials to {_redact(url)} "
                    "over plain TCP: use rediss:// (TLS) or a unix:// socket, or set OPTIONS "
                    "'credentials_over_plain_tcp': True on a network you trust."
                )

    @classmethod
    def _client_cache(cls, value: Any, cluster: bool) -> dict[str, Any] | None:
        """The client-side cache's settings, or None when it is off."""
        settings = cls._settings("client_cache", value, _CLIENT_CACHE_DEFAULTS, _CLIENT_CACHE_KINDS)
        if settings is not None and cluster:
            raise ImproperlyConfigured(
                "OPTIONS 'client_cache' does not work with 'cluster' and redis-py's retries "
                "('retry', 'retry_on_error', 'retry_on_timeout'): the client-side cache "
                "follows the slot map that the module keeps, and redis-py's RedisCluster "
                "routes instead. Turn one of them off."
            )
        return settings

    @staticmethod
    def _settings(
        option: str, value: Any, defaults: dict[str, Any], kinds: dict[str, tuple[type, float]]
    ) -> dict[str, Any] | None:
        """An option that is True, False or a dict of settings: its settings, or None."""
        if value is False or value is None:
            return None
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ImproperlyConfigured(
                f"OPTIONS {option!r} must be True, False or a dict of "
                f"{', '.join(defaults)}, not {value!r}."
            )
        unknown = sorted(set(value) - set(defaults))
        if unknown:
            raise ImproperlyConfigured(
                f"OPTIONS {option!r} has no setting {unknown[0]!r}; it takes {', '.join(defaults)}."
            )
        settings = {**defaults, **value}
        for name, (kind, minimum) in kinds.items():
            try:
                settings[name] = _checked(settings, name, kind, minimum=minimum)
            except ImproperlyConfigured as error:
                message = str(error).replace("OPTIONS", f"OPTIONS {option!r} setting", 1)
                raise ImproperlyConfigured(message) from None
        return settings

    @staticmethod
    def _sentinel_addresses(value: Any) -> list[tuple[str, int]]:
        if value is None:
            return []
        try:
            addresses = [_host_port(v) if isinstance(v, str) else (v[0], int(v[1])) for v in value]
        except (TypeError, ValueError, IndexError, ImproperlyConfigured):
            addresses = []
        if not addresses:
            shown = [_redact(v) if isinstance(v, str) else v for v in value]
            raise ImproperlyConfigured(
                "OPTIONS 'sentinels' must list the sentinels as 'host:port' or (host, port), "
                f"not {shown!r}."
            )
        return addresses

    @staticmethod
    def _serializer(own: dict[str, Any], django_redis: bool = False) -> Any:
        value = own["serializer"]
        protocol = own["pickle_protocol"]
        if protocol is not None and (
            type(protocol) is not int or protocol > pickle.HIGHEST_PROTOCOL
        ):
            raise ImproperlyConfigured(
                "OPTIONS 'pickle_protocol' (django-redis's PICKLE_VERSION) must be an int up to "
                f"pickle.HIGHEST_PROTOCOL ({pickle.HIGHEST_PROTOCOL}), not {protocol!r}."
            )
        if value == "pickle":
            # pickle's default protocol, as django-redis writes (Django's RedisCache writes the
            # highest; each reads the other's).
            return RedisSerializer(pickle.DEFAULT_PROTOCOL if protocol is None else protocol)
        if value == "json" and django_redis:
            return _DjangoRedisJSON()
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
        if not all(callable(getattr(value, name, None)) for name in ("dumps", "loads")):
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
    def _parser(parser_class: type, *, sync: bool) -> type:
        import redis._parsers as parsers

        if parser_class.__name__.startswith("_Async") != sync:
            return parser_class
        twin = _twin_class(parser_class, parsers, "redis._parsers")
        if twin is None:
            kind = "sync" if sync else "asyncio"
            raise ImproperlyConfigured(
                f"OPTIONS 'parser_class' {parser_class!r} has no {kind} counterpart in redis-py."
            )
        return twin

    def _check_keys(self, redis_options: dict[str, Any]) -> None:
        names = ("Connection", "SSLConnection", "UnixDomainSocketConnection")
        modules = (redis.connection, redis.asyncio.connection)
        connection_classes: tuple[type, ...] = (
            *(getattr(module, name) for module in modules for name in names),
            *self.topology.client_classes,
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
                f"OPTIONS takes {', '.join(_OWN_OPTIONS)} and redis-py's "
                "connection pool arguments (max_connections, socket_timeout, db, ...)."
            )


# ---------------------------------------------------------------------------
# Topologies and pools: servers with replicas, Sentinel, Cluster; the pool registry
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    _SyncPool = redis.ConnectionPool
    _AsyncPool = redis.asyncio.ConnectionPool
else:
    _SyncPool = _AsyncPool = object


class _Turn(threading.Event):
    """A caller's place in a sync pool's queue, and since when it waits."""

    def __init__(self) -> None:
        super().__init__()
        self.since = time.monotonic()


class _AsyncTurn(asyncio.Event):
    """A caller's place in an asyncio pool's queue, and since when it waits."""

    def __init__(self) -> None:
        super().__init__()
        self.since = time.monotonic()


class _WaitForConnection(_SyncPool):
    """Mixed into redis-py's pools: as fast while a connection is free; when every one is in
    use, callers queue for one, first come first served, for up to ``timeout`` seconds
    (``redis.BlockingConnectionPool`` waits too, but costs a queue round trip every call).
    Counted for ``stats()["pools"]``, never on a plain checkout: the connections opened (at
    connect, a callback), the callers that waited and the longest wait (once a wait ends,
    under the queue's lock)."""

    def __init__(self, *args: Any, timeout: float | None = 20, **kwargs: Any) -> None:
        self.timeout = timeout
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        # redis-py calls this when it makes the pool and, in a forked child, at its first
        # use: the parent's waiters are not in the child.
        super().reset()
        self._queue: collections.deque[_Turn] = collections.deque()
        self._queue_lock = threading.Lock()
        self._opened = self._waits = 0
        self._longest_wait = 0.0

    def make_connection(self) -> Any:
        connection: Any = super().make_connection()
        connection.register_connect_callback(self._counted)
        return connection

    def _counted(self, connection: Any) -> None:
        """A connection of this pool connected (a callback of redis-py's, at each connect)."""
        self._opened += 1

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if not self._queue:  # nobody waits: take a free one if there is one
            if not args and not kwargs and self._plain:
                connection = self._idle_one()
                if connection is not None:
                    return connection
            try:
                if args or kwargs:  # redis-py's deprecated arguments
                    return super().get_connection(*args, **kwargs)
                return super().get_connection()
            except redis.exceptions.MaxConnectionsError:
                pass
        return self._wait_turn(*args, **kwargs)

    def _wait_turn(self, *args: Any, **kwargs: Any) -> Any:
        self._checkpid()  # a child forgets its parent's queue
        turn = _Turn()
        deadline = None if self.timeout is None else turn.since + self.timeout
        with self._queue_lock:
            self._queue.append(turn)
        try:
            while True:
                if self._queue[0] is turn:  # first in line: take the next free connection
                    turn.clear()
                    with contextlib.suppress(redis.exceptions.MaxConnectionsError):
                        return super().get_connection(*args, **kwargs)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise _PoolExhausted(_pool_exhausted(self))
                turn.wait(remaining)
        finally:
            waited = time.monotonic() - turn.since
            with self._queue_lock:
                self._queue.remove(turn)
                if self._queue:
                    self._queue[0].set()  # the next in line looks now
                self._waits += 1
                self._longest_wait = max(self._longest_wait, waited)

    @cached_property
    def _plain(self) -> bool:
        """Whether a free connection needs nothing of redis-py's per-call bookkeeping: no
        client-side cache of redis-py's, no credentials that stream (re-authenticated at
        each release). Maintenance notifications make the socket readable (then checked as
        redis-py checks it) or mark it to reconnect (then closed at release). redis-py's
        metrics count the connections taken and released by its own path (``_idle_one``
        and ``release`` take and give back in pairs)."""
        streaming = getattr(redis.credentials, "StreamingCredentialProvider", ())
        return getattr(self, "cache", None) is None and not isinstance(
            self.connection_kwargs.get("credential_provider"), streaming
        )

    @cached_property
    def _owns(self) -> Callable[[Any], Any] | None:
        """``owns_connection``, where a subclass has its own (Sentinel's: not if the master
        moved meanwhile); None: redis-py's, a comparison of pids."""
        own = type(self).owns_connection
        return None if own is redis.ConnectionPool.owns_connection else self.owns_connection

    def _idle_one(self) -> Any:
        """A free connection whose socket has nothing to read; None: none is free, or its
        socket is readable (closed by the server, or data left on it: it goes back, and
        redis-py's path checks it), or this is a forked child's first use (redis-py's path
        resets the pool: the pid is compared as redis-py compares it, since a fork without
        Python's fork hooks, uWSGI's, would not update a kept one)."""
        if self.pid != os.getpid():
            return None
        with self._lock:
            free = self._available_connections
            if not free:
                return None
            connection = free.pop()
            self._in_use_connections.add(connection)
        connection._django_redis_ex_taken = True  # given back by release() alike
        try:
            sock = connection._sock
            if sock is not None and not _readable(connection, sock):
                return connection
        except BaseException:
            self.release(connection)
            raise
        self.release(connection)
        return None

    def release(self, connection: Any) -> None:
        owns = self._owns  # None: redis-py's own test, the connection's pid
        if getattr(connection, "_django_redis_ex_taken", False) and (
            connection.pid == self.pid if owns is None else owns(connection)
        ):
            connection._django_redis_ex_taken = False
            with self._lock:
                if connection not in self._in_use_connections:
                    return
                self._in_use_connections.remove(connection)
                if getattr(connection, "_should_reconnect", False):  # maintenance: elsewhere
                    connection.disconnect()
                self._available_connections.append(connection)
        else:
            connection._django_redis_ex_taken = False
            super().release(connection)
        if self._queue:  # someone waits: the first in line looks now
            with self._queue_lock:
                if self._queue:
                    self._queue[0].set()


class _AsyncWaitForConnection(_AsyncPool):
    """The asyncio twin of ``_WaitForConnection`` (a pool per event loop: no thread locks),
    which also checks each idle connection before handing it out."""

    def __init__(self, *args: Any, timeout: float | None = 20, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._queue: collections.deque[_AsyncTurn] = collections.deque()
        self._opened = self._resumes = self._waits = 0
        self._longest_wait = 0.0

    def make_connection(self) -> Any:
        connection = super().make_connection()  # type: ignore[no-untyped-call]
        connection.register_connect_callback(self._counted)
        return connection

    def _counted(self, connection: Any) -> None:
        """A connection of this pool connected, or resumed a parked socket."""
        if getattr(connection, "_resumed", False):
            self._resumes += 1
        else:
            self._opened += 1

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if not self._queue:
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except redis.exceptions.MaxConnectionsError:
                pass
        return await self._wait_turn(*args, **kwargs)

    async def _wait_turn(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        turn = _AsyncTurn()
        self._queue.append(turn)
        try:
            while True:
                if self._queue[0] is turn:
                    turn.clear()
                    with contextlib.suppress(redis.exceptions.MaxConnectionsError):
                        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise _PoolExhausted(_pool_exhausted(self))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(turn.wait(), remaining)
        finally:
            self._queue.remove(turn)
            if self._queue:
                self._queue[0].set()
            self._waits += 1
            self._longest_wait = max(self._longest_wait, time.monotonic() - turn.since)

    async def release(self, connection: Any) -> None:
        connection._django_redis_ex_released = asyncio.get_running_loop().time()
        await super().release(connection)
        if self._queue:
            self._queue[0].set()

    async def ensure_connection(self, connection: Any) -> None:
        """redis-py's check of an idle connection before use, also where redis-py 8.1 skips it
        (RESP3): a connection with anything to read was closed by the server (a restart, its
        idle ``timeout``, CLIENT KILL), so it reconnects instead of failing the command. One
        idle for over 50 ms asks its socket too (a select(), about a microsecond), since the
        loop may not have run to see the close; busy connections skip that."""
        await connection.connect()
        released = getattr(connection, "_django_redis_ex_released", None)
        idle = released is not None and asyncio.get_running_loop().time() - released > 0.05
        try:
            stale = await connection.can_read() or (idle and _has_input(connection))
        except (redis.ConnectionError, OSError):
            stale = True
        if stale:
            await connection.disconnect()
            await connection.connect()


def _has_input(connection: Any) -> bool:
    """Whether an asyncio connection's socket has anything to read (here: the server's close)."""
    transport = getattr(getattr(connection, "_writer", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and _waiter(sock, 0)()


def _readable(connection: Any, sock: socket.socket) -> bool:
    """Whether ``sock`` (``connection``'s) has input: one ``poll``, its poller kept."""
    poller = connection.__dict__.get("_django_redis_ex_poller")
    if poller is None or poller[0] is not sock:
        if not hasattr(select, "poll"):  # Windows
            return bool(select.select([sock], [], [], 0)[0])
        polling = select.poll()
        polling.register(sock, select.POLLIN | select.POLLPRI)
        poller = connection._django_redis_ex_poller = (sock, polling)
    return bool(poller[1].poll(0))


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


class _PoolExhausted(redis.ConnectionError):
    """No free connection within the pool's ``timeout``: waiting again would only double it."""


def _pool_exhausted(pool: Any) -> str:
    return (
        f"No free Redis connection within {pool.timeout} s: all {pool.max_connections} "
        "of the pool are in use. Raise OPTIONS 'max_connections', or 'timeout' (the wait)."
    )


class _SharedAsyncRedis(redis.asyncio.Redis):
    """An asyncio client on a shared pool. ``aclose()`` releases only its own connection:
    1.x users close raw clients with ``aclose(close_connection_pool=True)``, and other cache
    objects on the loop still use the pool, which is closed with the loop instead."""

    line: _Line | None = None  # the multiplexed connection of this loop's pool

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool=False)


# The RedisCluster method that splits a command by slot, on redis-py's own command path
# (OPTIONS that ask for redis-py's retries), and how it takes the command's arguments where
# it takes them otherwise than as they are.
_CLUSTER_METHODS: dict[str, tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]] | None]] = {
    "MGET": ("mget_nonatomic", lambda args: (list(args),)),
    "MSET": ("mset_nonatomic", lambda args: (dict(zip(args[::2], args[1::2], strict=True)),)),
    "EXISTS": ("exists", None),
    "DEL": ("delete", None),
    "UNLINK": ("unlink", None),
}


class _ClusterCommands:
    """What a cluster client sends differently: multi-key commands split by slot (one round
    trip per node), and SCAN over every primary in turn behind one cursor."""

    @classmethod
    def split(cls, client: Any, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]] | None:
        """The splitting method and its arguments, if ``args`` spans slots."""
        found = _CLUSTER_METHODS.get(args[0])
        if found is None:
            return None
        keys = _keys_of(args) or ()
        if len({client.keyslot(key) for key in keys}) < 2:
            return None
        method, arguments = found
        return method, args[1:] if arguments is None else arguments(args[1:])

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
                reply = super().execute_command("SCAN", node_cursor, *args[2:], target_nodes=node)  # type: ignore[no-untyped-call]
                return _ClusterCommands.scan_reply(reply, args[1], count)
            split = _ClusterCommands.split(self, args)
            if split is not None:
                return getattr(self, split[0])(*split[1])
        return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]


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


class _ParkingLot:
    """Sockets of asyncio connections parked at their loop's shutdown (up to ``max_connections``
    a pool), taken up by the next loop's pool for the same server and settings with the
    server's session as it was (no TCP connection, no handshake): WSGI projects with async
    views run each request on a new loop (``async_to_sync``), and their connections stay as
    few as the worker's threads. A forked child closes its copies and never uses them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[Hashable, list[socket.socket]] = {}

    def park(self, key: Hashable, connection: Any, limit: int) -> bool:
        """Keep ``connection``'s socket, if it is idle and there is room; True if kept."""
        writer = getattr(connection, "_writer", None)
        sock = writer.transport.get_extra_info("socket") if writer is not None else None
        if sock is None or _has_input(connection):
            return False  # unread input: not a clean session to hand on
        with self._lock:
            parked = self._sockets.setdefault(key, [])
            if len(parked) >= limit:
                return False
            parked.append(socket.socket(fileno=os.dup(sock.fileno())))
        return True

    def take(self, key: Hashable) -> socket.socket | None:
        """A parked socket for ``key`` that the server has not closed meanwhile."""
        while True:
            with self._lock:
                parked = self._sockets.get(key)
                sock = parked.pop() if parked else None
            if sock is None or not _waiter(sock, 0)():
                return sock
            sock.close()  # readable while idle: the server closed it (restart, timeout)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        for parked in self._sockets.values():
            for sock in parked:
                sock.close()  # the child's copy of the descriptor: the parent keeps its own
        self._sockets = {}


_parking = _ParkingLot()


class _ResumableConnection(redis.asyncio.connection.Connection):
    """A TCP asyncio connection that resumes a parked socket when there is one."""

    parking_key: Hashable = None
    _resumed = False

    async def _connect(self) -> None:
        sock = _parking.take(self.parking_key) if self.parking_key is not None else None
        if sock is None:
            self._resumed = False
            await super()._connect()  # type: ignore[no-untyped-call]
            return
        self._reader, self._writer = await asyncio.open_connection(sock=sock)
        self._resumed = True

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        if self._resumed:  # the server's session goes on: only the parser is new
            self._parser.on_connect(self)  # type: ignore[no-untyped-call, unused-ignore]
            return
        await super().on_connect_check_health(check_health)


@functools.lru_cache(maxsize=256)
def _resumable_connection(parking_key: Hashable) -> type[_ResumableConnection]:
    """The connection class of the asyncio pools of one configuration of one server."""
    return type("_ResumableConnection", (_ResumableConnection,), {"parking_key": parking_key})


class _PoolRegistry:
    """Process-wide clients (each on its own pool), keyed by configuration: sync ones, one per
    key per process (redis-py resets a pool after ``fork()``); asyncio ones, one per key per
    event loop, held by the loop (an attribute of it; the registry keeps loops weakly), so a
    loop dropped without ``close()`` is collected with its connections. A loop's pools are
    disconnected when it shuts down its async generators (``asyncio.run``, ``async_to_sync``,
    uvicorn), or dropped once it is closed. A forked child starts with none: its parent's
    clients and sockets are never used, nor closed, there. Reads take no lock; creation does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sync: dict[Hashable, redis.Redis] = {}
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._held: dict[asyncio.AbstractEventLoop, _LoopClients] = {}  # loops without __dict__
        self._generation = 0  # how many forks this process is from the one that made it
        self._inherited: list[Any] = []  # the parent's loop clients, in a forked child

    def sync_client(self, key: Hashable, make: Callable[[], redis.Redis]) -> redis.Redis:
        client = self._sync.get(key)
        if client is None:
            with self._lock:
                client = self._sync.get(key)
                if client is None:
                    client = self._sync[key] = make()
        return client

    def async_client(self, topology: _Topology, index: int) -> redis.asyncio.Redis:
        """The running loop's client for ``topology``'s ``index``, made at first use."""
        loop = asyncio.get_running_loop()
        key = topology.async_keys[index]
        entry = self._clients_of(loop)
        client = entry.clients.get(key) if entry is not None else None
        if client is None:
            with self._lock:
                entry = self._clients_of(loop)
                if entry is None:
                    self._drop_closed_loops()
                    entry = self._attach(loop, _LoopClients(self, loop))
                client = entry.clients.get(key)
                if client is None:
                    client = entry.clients[key] = topology.make_async(index)
                    entry.shutdowns.append(functools.partial(topology.shut_down, client))
        return client

    def _clients_of(self, loop: asyncio.AbstractEventLoop) -> _LoopClients | None:
        entry = getattr(loop, "_django_redis_ex", None)
        if entry is None and self._held:
            entry = self._held.get(loop)
        # A forked child finds its parent's on the loop it inherited: not its own.
        return entry if entry is not None and entry.generation == self._generation else None

    def _attach(self, loop: asyncio.AbstractEventLoop, entry: _LoopClients) -> _LoopClients:
        inherited = getattr(loop, "_django_redis_ex", None)
        if inherited is not None:
            self._inherited.append(inherited)  # the parent's: kept, so never closed here
        try:
            loop._django_redis_ex = entry  # type: ignore[attr-defined]
        except AttributeError:  # a loop without __dict__ (uvloop): held here until closed
            self._held[loop] = entry
        self._loops.add(loop)
        return entry

    def _detach(self, loop: asyncio.AbstractEventLoop) -> _LoopClients | None:
        entry = self._clients_of(loop)
        if entry is not None:
            self._held.pop(loop, None)
            with contextlib.suppress(AttributeError):
                del loop._django_redis_ex  # type: ignore[attr-defined]
        self._loops.discard(loop)
        return entry

    def forget_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._detach(loop)

    def _drop_closed_loops(self) -> None:
        for loop in [loop for loop in self._loops if loop.is_closed()]:
            # Their sockets close when the transports are collected; nothing can await now.
            entry = self._detach(loop)
            if entry is not None:
                entry.abandon()

    def after_fork_in_child(self) -> None:
        _parking.after_fork_in_child()
        self._lock = threading.Lock()
        self._generation += 1
        self._inherited.append(dict(self._held))
        self._held.clear()
        self._loops = weakref.WeakSet()


def _forget_generator(generator: AsyncGenerator[None, None]) -> None:
    """The finalizer of a watcher collected with its loop: nothing left to close."""


class _LoopClients:
    """The clients of one event loop, and the async generator that closes them at shutdown."""

    def __init__(self, registry: _PoolRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.clients: dict[Hashable, redis.asyncio.Redis] = {}
        self.shutdowns: list[Callable[[], Awaitable[None]]] = []
        self.generation = registry._generation
        # Event loops close every live async generator at shutdown (shutdown_asyncgens),
        # while they can still run coroutines: the one hook that asyncio offers.
        self._watcher = self._close_at_shutdown(registry, loop)
        # Registered with the loop (firstiter), but with no finalizer: a loop dropped without
        # shutdown is collected with its pools, and asyncio's finalizer would schedule an
        # aclose() on that dying loop which nothing ever awaits.
        hooks = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(hooks.firstiter, _forget_generator)
        try:
            with contextlib.suppress(StopIteration):  # it stops at its yield, registered
                self._watcher.asend(None).send(None)
        finally:
            sys.set_asyncgen_hooks(*hooks)

    async def _close_at_shutdown(
        self, registry: _PoolRegistry, loop: asyncio.AbstractEventLoop
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if self.generation == registry._generation and not loop.is_closed():
                registry.forget_loop(loop)
                for shut_down in self.shutdowns:
                    try:
                        await shut_down()
                    except Exception:  # pragma: no cover - shutdown must go on
                        logger.warning(
                            "Could not close a Redis pool at loop shutdown", exc_info=True
                        )

    def abandon(self) -> None:
        """Finish the watcher without awaiting, for a loop that closed without shutdown."""
        self.shutdowns.clear()
        closing = self._watcher.aclose()
        try:
            with contextlib.suppress(StopIteration, RuntimeError):
                closing.send(None)
        finally:
            closing.close()  # never left unawaited, even if it could not start


_registry = _PoolRegistry()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_registry.after_fork_in_child)


class _Topology(abc.ABC):
    """Where a cache's data lives (one subclass per kind of deployment): its servers, and the
    clients that reach them by index (0 takes writes, 1 to ``readers`` serve reads)."""

    client_classes: tuple[type, ...] = ()  # whose keyword arguments OPTIONS may hold too
    atomic_move = True  # whether incr_version's old and new keys fit in one script

    def __init__(self, servers: list[str], config: _Config) -> None:
        self.servers, self.config = servers, config
        self.readers = 0

    @classmethod
    def pool_classes(cls, pool_class: Any) -> tuple[Any, Any]:
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

    def index_for(self, write: bool) -> int:
        """The client to use: writes go to the first, reads to a reader if there is one."""
        return random.randint(1, self.readers) if self.readers and not write else 0

    def sync_client(self, index: int) -> redis.Redis:
        return _registry.sync_client(self.pool_key("sync", index), lambda: self.make_sync(index))

    def async_client(self, index: int) -> redis.asyncio.Redis:
        return _registry.async_client(self, index)

    @cached_property
    def async_keys(self) -> list[Hashable]:
        return [self.pool_key("async", index) for index in range(self.readers + 1)]

    @cached_property
    def untracked(self) -> _Topology:
        """This topology on pools of its own: raw clients of a configuration with a
        client-side store, whose writes its connections would not report (NOLOOP)."""
        twin = copy.copy(self)
        vars(twin).pop("async_keys", None)
        vars(twin).pop("untracked", None)
        twin.config = copy.copy(self.config)
        twin.config.frozen = _freeze((self.config.frozen, "untracked"))
        return twin

    @abc.abstractmethod
    def pool_key(self, kind: str, index: int) -> Hashable:
        """What makes a pool different from another: equal keys share one pool."""

    @abc.abstractmethod
    def make_sync(self, index: int) -> redis.Redis:
        """A new sync client on a new pool."""

    @abc.abstractmethod
    def make_async(self, index: int) -> redis.asyncio.Redis:
        """A new asyncio client on a new pool, for the running loop."""

    async def shut_down(self, client: redis.asyncio.Redis) -> None:
        """Close an asyncio client's connections, while its loop can still run."""
        await client.connection_pool.disconnect()


class _Servers(_Topology):
    """One server, or a LOCATION list of them: writes go to the first, reads to the others."""

    def __init__(self, servers: list[str], config: _Config) -> None:
        super().__init__(servers, config)
        self.readers = len(servers) - 1
        for url in servers:
            _url_options(url)  # a URL redis-py cannot read fails now, its password unsaid

    def pool_key(self, kind: str, index: int) -> Hashable:
        # A server's pool, wherever it is listed: aliases that name it share it.
        return (kind, self.servers[index], self.config.frozen)

    def make_sync(self, index: int) -> redis.Redis:
        pool = self.config.sync_pool_class.from_url(self.servers[index], **self.config.sync_options)
        return redis.Redis(connection_pool=pool)

    def make_async(self, index: int) -> redis.asyncio.Redis:
        config = self.config
        pool = config.async_pool_class.from_url(self.servers[index], **config.async_options)
        if pool.connection_class is redis.asyncio.connection.Connection:  # plain TCP
            pool.connection_class = _resumable_connection(self.async_keys[index])
        return _SharedAsyncRedis(connection_pool=pool)

    async def shut_down(self, client: redis.asyncio.Redis) -> None:
        pool = client.connection_pool
        key = getattr(pool.connection_class, "parking_key", None)
        for connection in list(pool._available_connections) if key is not None else ():
            if not connection.is_connected:  # e.g. a call cancelled while it connected
                continue
            with contextlib.suppress(redis.ConnectionError, OSError):
                if not await connection.can_read():  # nothing left unread
                    _parking.park(key, connection, pool.max_connections)
        await super().shut_down(client)


def _url_options(url: str) -> dict[str, Any]:
    """What a LOCATION URL says besides where the server is: password, db, TLS."""
    try:
        options: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call, unused-ignore]
    except ValueError:  # redis-py's message may quote the URL or a piece of the password
        raise ImproperlyConfigured(
            f"LOCATION {_redact(url)!r} is not a Redis URL that redis-py can read: a '/', "
            "'?', '#' or '@' in a password must be percent-encoded."
        ) from None
    for name in ("host", "port", "path", "connection_class"):
        options.pop(name, None)
    return options


class _Sentinel(_Topology):
    """A master that Sentinel finds (client 0) and, with ``sentinel_replica_reads``, its
    replicas for reads (client 1). LOCATION names the service: ``redis://[:pw@]service/db``."""

    def __init__(self, servers: list[str], config: _Config) -> None:
        if len(servers) != 1:
            raise ImproperlyConfigured(
                "With OPTIONS 'sentinels', LOCATION is one URL naming the service, "
                "redis://[:password@]service_name[/db]."
            )
        super().__init__(servers, config)
        self.readers = 1 if config.sentinel_replica_reads else 0
        self.service = urlsplit(servers[0]).hostname
        self.connection_options = _url_options(servers[0])

    @classmethod
    def pool_classes(cls, pool_class: Any) -> tuple[Any, Any]:
        return _WaitingSentinelPool, _AsyncWaitingSentinelPool

    def pool_key(self, kind: str, index: int) -> Hashable:
        config = self.config
        sentinels = (tuple(config.sentinels), _freeze(config.sentinel_kwargs))
        return (kind, self.servers[0], config.frozen, sentinels, index)

    def make_sync(self, index: int) -> redis.Redis:
        return redis.Redis(connection_pool=self._pool(index, sync=True))

    def make_async(self, index: int) -> redis.asyncio.Redis:
        return _SharedAsyncRedis(connection_pool=self._pool(index, sync=False))

    def _pool(self, index: int, sync: bool) -> Any:
        """A new pool of the master (index 0) or of its replicas, with its own Sentinel."""
        config = self.config
        sentinel = redis.sentinel.Sentinel if sync else redis.asyncio.sentinel.Sentinel
        manager = sentinel(config.sentinels, sentinel_kwargs=config.sentinel_kwargs)
        pool_class = config.sync_pool_class if sync else config.async_pool_class
        options = config.sync_options if sync else config.async_options
        options = {**options, **self.connection_options}  # LOCATION's password, db, TLS win
        return pool_class(self.service, manager, is_master=index == 0, **options)

    async def shut_down(self, client: redis.asyncio.Redis) -> None:
        await super().shut_down(client)
        # Each sentinel's client: Sentinel.aclose() is redis-py 8.1+, not the floor's 8.0.
        for sentinel in client.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await sentinel.aclose()


class _Cluster(_Topology):
    """Redis Cluster: LOCATION lists startup nodes. The shells route each command to the
    primary of its slot (``route``), on that node's own pools, as on one server: a sync pool,
    and a multiplexed line per event loop; redis-py's RedisCluster serves ``get_client()``
    and OPTIONS that ask for redis-py's retries."""

    client_classes = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
    atomic_move = False  # incr_version's two keys lie in different slots: two round trips

    def __init__(self, servers: list[str], config: _Config) -> None:
        super().__init__(servers, config)
        self.startup_nodes = [_host_port(url) for url in servers]
        self.connection_options = _url_options(servers[0])
        if self.connection_options.pop("db", 0) not in (0, "0"):
            raise ImproperlyConfigured("Redis Cluster has only db 0: drop the /db of LOCATION.")
        if config.sync_options.get("db", 0) not in (0, "0"):
            raise ImproperlyConfigured("Redis Cluster has only db 0: drop OPTIONS 'db'.")
        if urlsplit(servers[0]).scheme == "rediss":
            self.connection_options["ssl"] = True
        self.encoding: str = config.sync_options.get("encoding", "utf-8")
        self.nodes: dict[str, _Servers] = {}  # a node's address: the node, with its pools
        self.sync_clients: dict[str, redis.Redis] = {}  # a node's address: its sync client
        self.recent_slots: dict[Any, int] = {}  # the slots of recent keys
        # One map per cluster and settings, whichever alias or OPTIONS dict reads it.
        startup = [self.node_address(host, port) for host, port in self.startup_nodes]
        self.slots = _slot_maps.setdefault(self.pool_key("sync", 0), _SlotMap(startup))

    def pool_key(self, kind: str, index: int) -> Hashable:
        return (kind, tuple(self.servers), self.config.frozen, "cluster")

    def node_address(self, host: str, port: int) -> str:
        """A node's "host:port" (an IPv6 host in brackets, as in a URL)."""
        return f"[{host}]:{port}" if ":" in host and host[:1] != "[" else f"{host}:{port}"

    def node(self, address: str) -> _Servers:
        """The node at ``address`` ("host:port"), as a server of its own: its URL is
        LOCATION's first, at that address (its scheme, credentials and query)."""
        node = self.nodes.get(address)
        if node is None:
            url = urlsplit(self.servers[0])
            credentials = url.netloc.rpartition("@")[0]
            netloc = f"{credentials}@{address}" if credentials else address
            node = _Servers([urlunsplit((url.scheme, netloc, "", url.query, ""))], self.config)
            node = self.nodes.setdefault(address, node)
        return node

    def make_sync(self, index: int) -> redis.Redis:
        options = {k: v for k, v in self.config.sync_options.items() if k != "timeout"}
        # The node pools wait like ours; RedisCluster hands them no 'timeout' argument.
        wait = self.config.sync_options.get("timeout", _DEFAULT_POOL_OPTIONS["timeout"])
        node_pool = type(
            "_ClusterNodePool",
            (_WaitingPool,),
            {"__init__": functools.partialmethod(_WaitingPool.__init__, timeout=wait)},
        )
        # redis-py uses connection_pool_class only for a client made from a URL.
        others = [redis.cluster.ClusterNode(h, p) for h, p in self.startup_nodes[1:]]  # type: ignore[no-untyped-call, unused-ignore]
        client = _SharedCluster(
            url=self.servers[0], startup_nodes=others, connection_pool_class=node_pool, **options
        )
        return cast(redis.Redis, client)  # it takes every command the drivers send

    def make_async(self, index: int) -> redis.asyncio.Redis:
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in self.startup_nodes]
        options = {k: v for k, v in self.config.async_options.items() if k != "timeout"}
        client = _SharedAsyncCluster(startup_nodes=nodes, **self.connection_options, **options)
        return cast(redis.asyncio.Redis, client)

    async def shut_down(self, client: redis.asyncio.Redis) -> None:
        await redis.asyncio.cluster.RedisCluster.aclose(cast(_SharedAsyncCluster, client))

    # Routing: what goes to which primary; sans I/O, for both shells ------------------

    def slot(self, key: Any) -> int:
        """``key``'s slot; those of recent keys are kept (a key is read again and again)."""
        recent = self.recent_slots
        slot = recent.get(key)
        if slot is None:
            slot = _key_slot(key.encode(self.encoding) if type(key) is str else key)
            if len(recent) >= 65536:
                recent.clear()
            recent[key] = slot
        return slot

    def node_client(self, address: str) -> redis.Redis:
        client = self.sync_clients.get(address)
        if client is None:  # the registry's, kept here: its key is hashed once
            client = self.sync_clients[address] = self.node(address).sync_client(0)
        return client

    def one_node(self, commands: list[tuple[Any, ...]]) -> str | None:
        """The node that serves all of ``commands``, if each names one key (the usual
        call) and the map is fresh; None: ``route`` sends them."""
        slots = self.slots
        owner, node = slots.owner, None
        if slots.stale or not owner:
            return None
        for command in commands:
            at = _ONE_KEY_AT.get(command[0])
            if at is None or (at < 0 and command[2] != 1):
                return None
            serves = owner[self.slot(command[at if at > 0 else 3])]
            if serves != node and node is not None:
                return None
            node = serves
        return node

    def route(
        self, commands: list[tuple[Any, ...]], sent: tuple[str, list[Any]] | None = None
    ) -> Generator[Any, Any, list[Any]]:
        """The replies of ``commands``, each sent to the primary of its keys' slot: yields
        the sends to make at once, ``[(node address, commands), ...]``, and takes each one's
        replies or exception; or yields a float, seconds to sleep. A command that spans
        slots goes out as one per slot (its table row's ``split``), a command that names no
        key with the next that does. ``MOVED`` updates the map and resends to the node
        named; ``ASK`` resends once after ``ASKING``; ``TRYAGAIN`` (keys of a slot on its
        way) after a pause; up to ``_REDIRECTS`` times, then the error reply is the
        command's. A node that fails fails the call. ``sent``: the node all ``commands``
        went to already (``one_node``), and its replies, some of them redirections."""
        slots = self.slots
        if sent is None:
            # Not read yet: each first caller reads it; stale (a MOVED, a node that failed):
            # read again, at most every _REFRESH_EVERY seconds while no node answers it whole.
            if not slots.owner or (slots.stale and time.monotonic() >= slots.refresh_at):
                yield from self._refresh()
            sends = _by_node(self._pieces(commands))
            outcomes = yield _sends(sends)
        else:
            node, replies = sent
            sends = {node: [[i, command, node, False] for i, command in enumerate(commands)]}
            outcomes = [replies]
        # Each piece: [what it answers (index, or (index, part)), command, node, asking].
        answered: dict[Any, Any] = {}
        for again in range(_REDIRECTS, -1, -1):
            pieces, failure, pause = [], None, False
            for (node, group), outcome in zip(sends.items(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    failure = failure or outcome
                    continue
                replies = iter(outcome)
                for piece in group:
                    if piece[3]:
                        next(replies)  # ASKING's
                    reply = answered[piece[0]] = next(replies)
                    if isinstance(reply, redis.exceptions.AskError) and not piece[3]:
                        moved = isinstance(reply, redis.exceptions.MovedError)
                        target = self._target(reply, node)
                        self.redirected(reply.slot_id, node, target, moved)
                        pieces.append([piece[0], piece[1], target, not moved])
                    elif isinstance(reply, redis.exceptions.TryAgainError):
                        one_by_one = self._one_by_one(piece, answered)
                        pieces += one_by_one
                        pause = pause or one_by_one == [piece]  # as it is: after a pause
            if failure is not None:
                slots.stale = True  # a failover may have moved its slots
                raise failure
            if not pieces or not again:
                break
            if pause:
                yield _TRY_AGAIN_PAUSE
            sends = _by_node(pieces)
            outcomes = yield _sends(sends)
        return self._merged(commands, answered)

    def _one_by_one(self, piece: list[Any], answered: dict[Any, Any]) -> list[list[Any]]:
        """A piece on several keys of a slot on its way (``TRYAGAIN``: some of them moved),
        as one piece per key, each of which follows its own ``ASK``, if its command splits
        (``MGET`` of one key, ...); else the piece, to go again as it is."""
        command = piece[1]
        row = _COMMANDS.get(command[0], _UNKNOWN)
        keys = _keys_of(command) or []
        if row.split is None or len(keys) < 2:
            return [piece]
        answered.pop(piece[0], None)
        index, ats = piece[0] if type(piece[0]) is tuple else (piece[0], range(len(keys)))
        step = row.step
        return [
            [
                (index, (at,)),
                (command[0], *command[1 + n * step : 1 + (n + 1) * step]),
                piece[2],
                False,
            ]
            for n, at in enumerate(ats)
        ]

    def _target(self, reply: Any, source: str) -> str:
        """The node a ``MOVED`` or ``ASK`` reply names (no host: the source's)."""
        host = reply.host if reply.host not in ("", "?") else source.rpartition(":")[0]
        return self.node_address(host, reply.port)

    def _merged(self, commands: list[tuple[Any, ...]], answered: dict[Any, Any]) -> list[Any]:
        """The replies of ``commands`` from those of their pieces (keyed ``(index, part)``
        where a command was split), in order: an error reply of a piece is the command's."""
        replies: list[Any] = []
        for index, command in enumerate(commands):
            reply = answered.get(index, _MISSING)
            if reply is _MISSING:
                parts = {k[1]: v for k, v in answered.items() if type(k) is tuple and k[0] == index}
                errors = [v for v in parts.values() if isinstance(v, Exception)]
                if errors:
                    reply = errors[0]
                elif command[0] == "FLUSHDB":
                    reply = next(iter(parts.values()))
                else:
                    reply = _MERGES[_COMMANDS[command[0]].split or ""](len(command) - 1, parts)
            elif command[0] == "SCAN" and not isinstance(reply, Exception):
                count = len(self.slots.primaries)
                reply = _ClusterCommands.scan_reply(reply, int(command[1]), count)
            replies.append(reply)
        return replies

    def _pieces(self, commands: list[tuple[Any, ...]]) -> list[list[Any]]:
        """The commands as sent: each to its slot's primary, split by slot if it spans slots."""
        slots = self.slots
        owner = slots.owner
        pieces: list[list[Any]] = []
        keyless: list[list[Any]] = []  # to go with the next command that names keys
        for index, command in enumerate(commands):
            row = _COMMANDS.get(command[0], _UNKNOWN)
            if row.first == 1 and row.last == 1:  # the usual: one key, the first argument
                node = owner[self.slot(command[1])]
            else:
                keys = _keys_of(command)
                if not keys:
                    if keys is None:  # FLUSHDB: on every primary
                        pieces += [[(index, n), command, n, False] for n in slots.primaries]
                    elif command[0] == "SCAN":
                        pieces.append([index, *self._scan(command), False])
                    else:
                        keyless.append([index, command, None, False])
                    continue
                by_slot: dict[int, list[int]] = {}
                for at, key in enumerate(keys):
                    by_slot.setdefault(self.slot(key), []).append(at)
                if len(by_slot) > 1 and row.split is not None:
                    step = row.step
                    for slot, ats in by_slot.items():
                        args = [
                            a for at in ats for a in command[1 + at * step : 1 + (at + 1) * step]
                        ]
                        piece = [(index, tuple(ats)), (command[0], *args), owner[slot], False]
                        pieces.append(piece)
                    continue
                node = owner[next(iter(by_slot))]  # in several slots: Redis says CROSSSLOT
            for piece in keyless:
                piece[2] = node
            pieces += keyless
            keyless = []
            pieces.append([index, command, node, False])
        for piece in keyless:  # none named a key: any primary answers
            piece[2] = slots.primaries[0]
        return pieces + keyless

    def _scan(self, command: tuple[Any, ...]) -> tuple[tuple[Any, ...], str]:
        """SCAN over every primary in turn, behind one cursor (``_merged`` makes the next)."""
        primaries = self.slots.primaries
        cursor = int(command[1])
        node = primaries[cursor % len(primaries)]
        return ("SCAN", cursor // len(primaries), *command[2:]), node

    def redirected(self, slot: int, source: str, target: str, moved: bool) -> None:
        """A ``MOVED`` (the slot is the target's now) or ``ASK`` (one key is) from ``source``."""
        slots = self.slots
        if moved and slots.owner[slot] != target:
            slots.owner[slot] = target
            slots.stale = True  # others moved too, most likely: the map is read again
        # ASK: one key is elsewhere (the others of the slot are still here, or their MIGRATE
        # invalidated them): only the reads in flight are voided, no entry is looked at.
        slots.moved({source: {slot}}, entries=moved)

    def _refresh(self) -> Generator[Any, Any, None]:
        """Read the slot map from the first node that answers ``CLUSTER SLOTS``."""
        slots = self.slots
        slots.stale = False  # one caller reads it; the others go on with the map they have
        slots.refresh_at = time.monotonic() + _REFRESH_EVERY
        failure: BaseException | None = None
        for node in slots.known():
            outcome = (yield [(node, [_CLUSTER_SLOTS])])[0]
            reply = outcome if isinstance(outcome, BaseException) else outcome[0]
            if isinstance(reply, BaseException):
                failure = reply
                continue
            owner = [""] * _SLOTS
            for first, last, primary, *_ in reply:
                host = primary[0].decode() if type(primary[0]) is bytes else primary[0]
                if not host or host == "?":  # the node asked does not know its own address
                    host = node.rpartition(":")[0]
                address = self.node_address(host, int(primary[1]))
                owner[first : last + 1] = [address] * (last + 1 - first)
            if "" in owner:
                failure = redis.exceptions.ClusterDownError("CLUSTERDOWN Hash slot not served")
                continue
            self._set(owner)
            return
        slots.stale = True
        if not slots.owner:
            raise redis.ConnectionError(
                f"No node of the Redis Cluster answered CLUSTER SLOTS: {failure}"
            ) from failure

    def _set(self, owner: list[str]) -> None:
        slots = self.slots
        old, slots.owner = slots.owner, owner
        slots.primaries = sorted(set(owner))
        slots.addresses.update(dict.fromkeys(slots.primaries))
        if old:
            moves: dict[str, set[int]] = {}
            for slot, (was, now) in enumerate(zip(old, owner, strict=True)):
                if was != now:
                    moves.setdefault(was, set()).add(slot)
            if moves:
                slots.moved(moves)


_SLOTS = 16384
_slot_maps: dict[Hashable, _SlotMap] = {}
_REDIRECTS_OF = (redis.exceptions.AskError, redis.exceptions.TryAgainError)


def _redirected(replies: list[Any]) -> bool:
    """Whether a reply sends its command elsewhere (``MOVED``, ``ASK``) or again (``TRYAGAIN``):
    the drivers' usual call then goes on through ``_Cluster.route``."""
    return any(isinstance(reply, _REDIRECTS_OF) for reply in replies)


_REDIRECTS = 5  # MOVED, ASK or TRYAGAIN replies followed for one command, at most
_TRY_AGAIN_PAUSE = 0.05  # seconds before a command answered TRYAGAIN goes again
_REFRESH_EVERY = 0.1  # seconds between two reads of a stale slot map, at least
_CLUSTER_SLOTS = ("CLUSTER", "SLOTS")
_key_slot = redis.crc.key_slot


class _SlotMap:
    """Which primary serves each slot, as the cluster said last; shared by threads and loops."""

    def __init__(self, startup: list[str]) -> None:
        self.owner: list[str] = []  # a node address per slot; empty until read
        self.primaries: list[str] = []  # the nodes that serve slots, sorted
        self.addresses = dict.fromkeys(startup)  # every node heard of, in order
        self.stale = True  # read it again before the next send
        self.refresh_at = 0.0  # time.monotonic() before which it is not read again
        self.moves = 0  # how many times slots were seen to move (or a key, by ASK)
        # Told of each move, by the node it left: the client-side stores.
        self.listeners: list[Callable[[dict[str, set[int]], bool], None]] = []

    def moved(self, moves: dict[str, set[int]], entries: bool = True) -> None:
        self.moves += 1
        for listener in self.listeners:
            listener(moves, entries)

    def known(self) -> list[str]:
        """The nodes to ask for the map: those serving slots first, at a random one."""
        primaries = self.primaries
        start = random.randrange(len(primaries)) if primaries else 0
        ordered = primaries[start:] + primaries[:start]
        return ordered + [a for a in self.addresses if a not in ordered]


def _by_node(pieces: list[list[Any]]) -> dict[str, list[list[Any]]]:
    sends: dict[str, list[list[Any]]] = {}
    for piece in pieces:
        sends.setdefault(piece[2], []).append(piece)
    return sends


def _sends(by_node: dict[str, list[list[Any]]]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """What each node is sent: its pieces' commands, ``ASKING`` before those asked."""
    return [
        (node, [each for piece in group for each in _asked(piece)])
        for node, group in by_node.items()
    ]


def _asked(piece: list[Any]) -> list[tuple[Any, ...]]:
    return [_ASKING, piece[1]] if piece[3] else [piece[1]]


_ASKING = ("ASKING",)


def _values_merged(count: int, parts: dict[Any, Any]) -> list[Any]:
    values: list[Any] = [None] * count
    for ats, found in parts.items():
        for at, value in zip(ats, found, strict=True):
            values[at] = value
    return values


# How the replies of a command split by slot merge (its table row's ``split``).
_MERGES: dict[str, Callable[[int, dict[Any, Any]], Any]] = {
    "values": _values_merged,  # MGET: in the order of the keys
    "count": lambda count, parts: sum(parts.values()),
    "ok": lambda count, parts: all(parts.values()),
}


_NO_OPTIONS: dict[str, Any] = {}
_topologies: dict[Hashable, tuple[dict[str, Any], _Topology]] = {}


def _topology_for(
    servers: list[str], options: dict[str, Any], prefix: str | None = None
) -> _Topology:
    """The checked configuration, parsed once per settings dict rather than per request: Django
    builds a cache object per request from the same OPTIONS dict, which the entry holds, so
    its id cannot be reused meanwhile. ``prefix``: the keys a client-side store tracks."""
    key = (tuple(servers), id(options), prefix)
    entry = _topologies.get(key)
    if entry is None or entry[0] is not options:
        if len(_topologies) >= 64:  # settings that come and go (tests): start afresh
            _topologies.clear()
        config = _Config(options, prefix)
        config.check_credentials(servers)
        entry = _topologies[key] = (options, config.topology(servers, config))
    return entry[1]


# ---------------------------------------------------------------------------
# The command table: what the module knows of each Redis command it sends
# ---------------------------------------------------------------------------


class _Command(NamedTuple):
    """A Redis command as the policy sees it, its keys where ``COMMAND INFO`` puts them."""

    writes: bool  # it may change keys: the client-side store drops those it names
    replica: bool  # a read that a replica may answer
    resend: bool  # it may go out once more after a dead connection: the same effect twice
    first: int = 1  # where its first key is; 0: it names none; -1: it may change any key
    last: int = 1
    step: int = 1
    numkeys: int = 0  # where the number of its keys is given (EVAL, EVALSHA)
    split: str | None = None  # on Cluster, split by slot: how its pieces' replies merge


_READ = _Command(writes=False, replica=True, resend=True)
_READ_MANY = _Command(writes=False, replica=True, resend=True, last=-1)
_WRITE = _Command(writes=True, replica=False, resend=False)
_WRITE_MANY = _Command(writes=True, replica=False, resend=False, last=-1)
_NO_KEY = _Command(writes=False, replica=False, resend=False, first=0)

# Every command the module sends (a test checks that). A command not here takes the safe side
# everywhere: the first server, never sent twice, and it drops every key the store holds.
_COMMANDS: dict[str, _Command] = {
    **dict.fromkeys(("GET", "TTL", "PTTL", "SCARD", "SISMEMBER", "SMISMEMBER", "SMEMBERS"), _READ),
    **dict.fromkeys(("SRANDMEMBER", "SSCAN", "HLEN", "HKEYS", "HEXISTS", "HGET", "HGETALL"), _READ),
    **dict.fromkeys(("HMGET", "ZCARD", "ZCOUNT", "ZRANGE", "ZRANGEBYSCORE", "ZRANK"), _READ),
    **dict.fromkeys(("ZSCORE", "ZMSCORE", "ZREVRANGE", "ZREVRANGEBYSCORE"), _READ),
    **dict.fromkeys(("SDIFF", "SINTER", "SUNION"), _READ_MANY),
    "MGET": _READ_MANY._replace(split="values"),
    "EXISTS": _READ_MANY._replace(split="count"),
    "SCAN": _NO_KEY._replace(resend=True),
    # Writes whose second run changes nothing (unless NX or XX make them conditional).
    "SET": _WRITE._replace(resend=True),
    "MSET": _WRITE_MANY._replace(resend=True, step=2, split="ok"),
    **dict.fromkeys(("EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST", "INCRBY"), _WRITE),
    **dict.fromkeys(("SADD", "SREM", "SPOP", "HSET", "HDEL", "HINCRBY"), _WRITE),
    **dict.fromkeys(("ZADD", "ZINCRBY", "ZPOPMAX", "ZPOPMIN", "ZREM", "ZREMRANGEBYSCORE"), _WRITE),
    **dict.fromkeys(("SDIFFSTORE", "SINTERSTORE", "SUNIONSTORE"), _WRITE_MANY),
    "SMOVE": _WRITE._replace(last=2),
    "DEL": _WRITE_MANY._replace(split="count"),
    "UNLINK": _WRITE_MANY._replace(split="count"),
    **dict.fromkeys(("EVALSHA", "EVAL"), _WRITE._replace(first=3, numkeys=2)),
    # A read-only script (a tagged read) reads the tags' keys too, which it does not name.
    **dict.fromkeys(("EVALSHA_RO", "EVAL_RO"), _READ._replace(first=3, numkeys=2)),
    "FLUSHDB": _WRITE._replace(first=-1),
    **dict.fromkeys(("CONFIG", "PING", "CLIENT", "CLUSTER", "ASKING", "ROLE"), _NO_KEY),
}
_UNKNOWN = _Command(writes=True, replica=False, resend=False, first=-1)
# Where the client-side store finds the keys a command changes, on its path per write: 0 for
# none (a read), 1 for its only key, -1 for a script's (their number at 2, from 3 on), or
# None (see its row).
_KEY_AT: dict[str, int | None] = {
    name: (1 if (row.first, row.last) == (1, 1) else -1 if row.numkeys else None)
    if row.writes
    else 0
    for name, row in _COMMANDS.items()
}


# On a cluster, where a command names its one key: 1, its first argument; -1, a script's
# (if it names one).
_ONE_KEY_AT = {
    name: 1 if (row.first, row.last) == (1, 1) else -1
    for name, row in _COMMANDS.items()
    if (row.first, row.last) == (1, 1) or row.numkeys
}


def _keys_of(command: tuple[Any, ...]) -> list[Any] | None:
    """The keys ``command`` names, where its row places them; None: it may touch any key."""
    row = _COMMANDS.get(command[0], _UNKNOWN)
    first = row.first
    if first <= 0:
        return None if first < 0 else []
    if row.numkeys:
        return list(command[first : first + int(command[row.numkeys])])
    last = len(command) + row.last if row.last < 0 else row.last
    return list(command[first : last + 1 : row.step])


def _keys_written(command: tuple[Any, ...]) -> list[Any] | None:
    """The keys ``command`` may change: none for a read; None for every key."""
    return _keys_of(command) if _COMMANDS.get(command[0], _UNKNOWN).writes else []


def _replica_safe(commands: list[tuple[Any, ...]]) -> bool:
    return all(_COMMANDS.get(command[0], _UNKNOWN).replica for command in commands)


def _resendable(commands: list[tuple[Any, ...]], error: BaseException) -> bool:
    """Whether ``commands`` may go out again on a new connection after ``error``: theirs may
    have died idle (a restart, the idle ``timeout``); a server that is down fails again at
    once. Never after a timeout (a frozen server), wrong credentials or a pool wait."""
    return (
        isinstance(error, redis.ConnectionError)
        and not isinstance(error, (_PoolExhausted, _CircuitOpen))
        and not _wrong_credentials(error)
        and all(
            _COMMANDS.get(c[0], _UNKNOWN).resend and "NX" not in c and "XX" not in c
            for c in commands
        )
    )


# ---------------------------------------------------------------------------
# Operations: what each cache method sends to Redis and how the reply becomes a result
# ---------------------------------------------------------------------------
# An operation is a generator that does no I/O. It yields a command (a tuple of arguments), a
# pipeline (a list of such tuples), a pause (``_Sleep``) or a computation (``_Compute``); it
# receives each reply and returns the method's result. The policy runs the same generators
# on both paths, so the two cannot drift apart, and tests run them against scripted replies.
# Each call of a cache method is one round trip unless said. An iteration is a plan per page.

_T = TypeVar("_T")


class _Sleep:
    """A pause: ``time.sleep`` or ``asyncio.sleep`` by path. Its reply is the clock after it
    (``time.monotonic()`` or the loop's time), so operations never read a clock themselves."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class _Compute:
    """A call of the user's default (``get_or_set``): its reply is the value. The asyncio
    driver awaits what a coroutine function returns; the sync one refuses it. If ``catch``,
    an exception it raises is the reply, as a ``_Failed``."""

    __slots__ = ("catch", "default")

    def __init__(self, default: Callable[[], Any], catch: bool = False) -> None:
        self.default, self.catch = default, catch


class _Failed:
    """The reply of a ``_Compute`` that catches, whose default raised ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Background:
    """A plan to run apart: the asyncio driver runs it in a task of its own and replies
    ``_MISSING`` at once; the sync driver replies ``_INLINE``: the operation runs it itself."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan[Any]) -> None:
        self.plan = plan


_INLINE = object()  # see _Background

Command = Union[tuple[Any, ...], list[tuple[Any, ...]], _Sleep, _Compute, _Background]  # noqa: UP007
Operation = Generator[Command, Any, _T]
_Page = tuple[int, list[Any]]  # an iteration's next cursor (0: done), and what it found


class Plan(Generic[_T]):
    """A call of a cache method, ready for the policy: the method's name (for the log), the
    operation, and its fallback: what it returns (or raises) if ignore_exceptions ignores."""

    __slots__ = ("fallback", "method", "operation", "trace", "undo")
    primary = False  # whether reads go to the server that takes writes too (_OnPrimary)
    ignorable = True  # whether ignore_exceptions covers it (not _Unignorable)
    trace: Any  # set while the call is traced: its span and context

    def __init__(
        self,
        method: str,
        operation: Operation[_T],
        fallback: Callable[[], _T],
        undo: list[tuple[Any, ...]] | None = None,
    ) -> None:
        self.method = method
        self.operation = operation
        self.fallback = fallback
        # Commands the operation puts here while it holds something (a lock) and takes back
        # when it lets go: sent, best effort, if the call fails, is cancelled or times out.
        self.undo = _NOTHING_TO_UNDO if undo is None else undo


class _OnPrimary(Plan[_T]):
    """A plan whose reads go to the server that takes writes too (read-your-writes)."""

    __slots__ = ()
    primary = True


class _Unignorable(Plan[_T]):
    """A plan whose failure is always raised, ignore_exceptions or not: an invalidation
    that did not happen must not read as one that did."""

    __slots__ = ()
    ignorable = False


_NOTHING_TO_UNDO: list[tuple[Any, ...]] = []  # never appended to: shared by plans

# A method's counts (``cache.stats()``): a list indexed by these. Reads that find keys or not
# (get, get_many, get_or_set, has_key) count hits and misses in their operations.
_CALLS, _HITS, _MISSES, _ERRORS, _IGNORED = range(5)
_STAT_NAMES = ("calls", "hits", "misses", "errors", "ignored")


def _false() -> bool:
    return False


def _no_page() -> _Page:
    return 0, []


def _none() -> None:
    return None


def _zero() -> int:
    return 0


def _key_not_found(key: Any) -> NoReturn:
    """What Django's incr raises for a missing key."""
    raise ValueError(f"Key '{key}' not found.")


_SCRIPTS: dict[str, str] = {}


class _Script:
    """A Lua script sent by its SHA1; the driver falls back to EVAL after NOSCRIPT."""

    def __init__(self, source: str, read_only: bool = False) -> None:
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        _SCRIPTS[self.sha] = source
        # EVALSHA_RO: a read, which a replica may run (Redis 7).
        self.name = "EVALSHA_RO" if read_only else "EVALSHA"

    def __call__(self, keys: Iterable[Any], args: Iterable[Any]) -> tuple[Any, ...]:
        keys = tuple(keys)
        return (self.name, self.sha, len(keys), *keys, *args)

    def whole(self, keys: Iterable[Any], args: Iterable[Any]) -> tuple[Any, ...]:
        """EVAL with the source: for a script followed by other commands in one round trip
        (after NOSCRIPT, those would have run without it)."""
        keys = tuple(keys)
        return ("EVAL", _SCRIPTS[self.sha], len(keys), *keys, *args)


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
# Sorted-set members that 2.0 stored raw (ints) become django-redis's form (ARGV: old, new
# pairs), keeping their scores; then the command that follows in the same round trip.
_ZCONVERGE = _Script(
    "for i = 1, #ARGV, 2 do "
    "local score = redis.call('ZSCORE', KEYS[1], ARGV[i]) "
    "if score then redis.call('ZREM', KEYS[1], ARGV[i]) "
    "redis.call('ZADD', KEYS[1], 'NX', score, ARGV[i + 1]) end end "
    "return 0"
)
# OPTIONS tags: INCRBY, unless the value starts with a NUL (tagged, perhaps: returned, for its
# tags to be checked); a missing key is created only if ARGV[2] is 1.
_INCR_UNTAGGED = _Script(
    "local v = redis.call('GET', KEYS[1]) "
    "if not v and ARGV[2] ~= '1' then return false end "
    "if v and string.byte(v) == 0 then return {v} end "
    "return redis.call('INCRBY', KEYS[1], ARGV[1])"
)
# Move a value to another key (keeping its expiry); 0 if there is none to move.
_RENAME_EXISTING = _Script(
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
    "redis.call('RENAME', KEYS[1], KEYS[2]) return 1"
)
# SMOVE of a signed member: signed for the first set in ARGV[1], for the second in ARGV[2].
_SMOVE_SIGNED = _Script(
    "local kind = redis.call('TYPE', KEYS[2]).ok "
    "if kind ~= 'set' and kind ~= 'none' then return redis.error_reply("
    "'WRONGTYPE Operation against a key holding the wrong kind of value') end "
    "if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then redis.call('SADD', KEYS[2], ARGV[2]) "
    "return 1 end return 0"
)
# Replace a set's members with ARGV (none: delete it); how many.
_REPLACE_SET = _Script(
    "redis.call('DEL', KEYS[1]) for i = 1, #ARGV, 1000 do "
    "redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end return #ARGV"
)
# OPTIONS "tags": whether a value read is valid (untagged, or each tag's key still holds the
# token in its header; read as _tag_pairs does), then the reads that use it on one server.
_TAG_CHECK = (
    "local tokens = {} local function valid(v) local at = 1 "
    "if string.sub(v, 1, 3) == '\\0rk' then at = 36 end "
    "if string.sub(v, at, at + 2) ~= '\\0rt' then return true end "
    "local line = string.find(v, '\\n', at + 3, true) if not line then return false end "
    "local size = string.sub(v, at + 3, line - 1) "
    "if not string.match(size, '^%d+$') then return false end "
    "local stop = line + tonumber(size) if stop >= #v then return false end at = line + 1 "
    "while at <= stop do local pair = {} for i = 1, 2 do "
    "local colon = string.find(v, ':', at, true) "
    "if not colon or colon > stop then return false end "
    "local length = string.sub(v, at, colon - 1) "
    "if not string.match(length, '^%d+$') then return false end "
    "local after = colon + 1 + tonumber(length) if after - 1 > stop then return false end "
    "pair[i] = string.sub(v, colon + 1, after - 1) at = after end "
    "local token = tokens[pair[1]] "
    "if token == nil then token = redis.call('GET', pair[1]) tokens[pair[1]] = token end "
    "if token ~= pair[2] then return false end end return true end "
)
_TAGGED_GET = _Script(
    "local v = redis.call('GET', KEYS[1]) "  # untagged: back at once (a NUL starts a tagged one)
    "if not v or string.byte(v) ~= 0 then return v end " + _TAG_CHECK + "if not valid(v) then "
    "return false end return v",
    read_only=True,
)
_TAGGED_MGET = _Script(
    _TAG_CHECK + "local values = {} for i, key in ipairs(KEYS) do local v = redis.call('GET', key) "
    "if v and string.byte(v) == 0 and not valid(v) then v = false end values[i] = v end "
    "return values",
    read_only=True,
)
_TAGGED_EXISTS = _Script(
    "local v = redis.call('GET', KEYS[1]) if not v then return 0 end "
    "if string.byte(v) ~= 0 then return 1 end " + _TAG_CHECK + "if valid(v) then return 1 end "
    "return 0",
    read_only=True,
)
# Write ARGV[2] (SET's options from ARGV[3]) if the key still holds ARGV[1]: a tagged entry
# found invalid is replaced, unless another value came meanwhile.
_SWAP = _Script(
    "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end "
    "redis.call('SET', KEYS[1], unpack(ARGV, 2)) return 1"
)
# Delete a lock only if it still holds our token.
_RELEASE_LOCK = _Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


def _set_command(key: str, data: Any, timeout: int | None, *flags: str) -> tuple[Any, ...]:
    if timeout is None:
        return ("SET", key, data, *flags)
    return ("SET", key, data, "EX", timeout, *flags)


class _Tags:
    """OPTIONS "tags": where a tag's key lives, and how a read checks an entry's tags. On one
    server (and Sentinel's) a script reads the entry and its tags' keys: one round trip. On
    Cluster a tag's key lies in another slot than its entries, out of a script's reach; with
    the client-side store, reads must stay GET and MGET for the store to keep them: there an
    entry found tagged costs a second round trip, an MGET of its tags' keys."""

    __slots__ = ("prefix", "script")

    def __init__(self, key_prefix: str, script: bool) -> None:
        # One slot for a prefix's tags on Cluster (the hash tag): an entry's tags are read by
        # one MGET on one node, and invalidate_tags is one DEL there.
        self.prefix = f"{key_prefix}:django-redis-ex:{{tags:{key_prefix}}}:"
        self.script = script

    def keys(self, tags: list[str]) -> list[str]:
        for tag in tags:
            if not isinstance(tag, str):
                raise TypeError(f"tags= takes str tags, not {tag!r}.")
        # A str subclass (a StrEnum member) by its value, as str.format writes it.
        return [self.prefix + str.__str__(tag) for tag in dict.fromkeys(tags)]


def _op_checked(values: list[Any]) -> Operation[list[Any]]:
    """``values`` read by GET or MGET, each tagged one whose tags were invalidated since it
    was written made None: one MGET of their tags' keys, if any is tagged. (A cache without
    OPTIONS tags reads a tagged entry this way too: never as valid after its invalidation.)"""
    pairs = [None if data is None else _tag_pairs(data) for data in values]
    if any(each is _MALFORMED for each in pairs):
        values = [
            None if each is _MALFORMED else data for data, each in zip(values, pairs, strict=True)
        ]
        pairs = [None if each is _MALFORMED else each for each in pairs]
    keys = list(dict.fromkeys(key for each in pairs if each for key, _ in each))
    if not keys:
        return values
    tokens = dict(zip(keys, (yield ("MGET", *[key.decode() for key in keys])), strict=True))
    return [
        None if each and any(tokens[key] != token for key, token in each) else data
        for data, each in zip(values, pairs, strict=True)
    ]


def _op_read(tags: _Tags, key: str) -> Operation[Any]:
    """GET with tags: an entry whose tags were invalidated reads as None."""
    if tags.script:
        return (yield _TAGGED_GET([key], []))
    return (yield from _op_checked([(yield ("GET", key))]))[0]


def _op_has(tags: _Tags | None, key: str) -> Operation[bool]:
    """EXISTS, with tags: an entry whose tags were invalidated is not there."""
    if tags is None:
        return bool((yield ("EXISTS", key)))
    if tags.script:
        return bool((yield _TAGGED_EXISTS([key], [])))
    return (yield from _op_read(tags, key)) is not None


def _op_header(tag_keys: list[str], timeout: int | None) -> Operation[bytes]:
    """The header of an entry written now with these tags: each tag's token, made if the tag
    has none (``SET NX``, then ``GET``), in one round trip. A tag's key lives as long as the
    entries written with it (``EXPIRE GT``; ``PERSIST`` for an entry that never expires)."""
    commands: list[tuple[Any, ...]] = []
    for key in tag_keys:
        token = os.urandom(8).hex()
        if timeout is None:
            commands += [("SET", key, token, "NX"), ("GET", key), ("PERSIST", key)]
        else:
            commands += [("SET", key, token, "NX", "EX", timeout), ("GET", key)]
            commands += [("EXPIRE", key, timeout, "GT")]
    replies = yield commands
    # A tag invalidated between the SET and the GET: an empty token, which never matches.
    tokens = [b"" if token is None else token for token in replies[1::3]]
    return _tags_header(zip([key.encode() for key in tag_keys], tokens, strict=True))


def _tagged_data(codec: _Codec, key: str, value: Any) -> bytes:
    """What a tagged entry of ``key`` holds after its header (fails before any write)."""
    plain = cast(_Bound, codec.at(key)).codec if codec.signed else codec
    data = _Codec.dumps(plain, value)
    return b"%d" % data if type(data) is int else cast(bytes, data)


def _wrapped(codec: _Codec, key: str, header: bytes, data: bytes) -> bytes:
    """The tagged entry of ``key``: ``header`` then ``data``, signed whole (sign_values)."""
    envelope = header + data
    return cast(bytes, cast(_Bound, codec.at(key)).sign(envelope)) if codec.signed else envelope


def _op_add(
    codec: _Codec,
    key: str,
    value: Any,
    timeout: int | None,
    tags: _Tags | None = None,
    tag_keys: list[str] | None = None,
) -> Operation[bool]:
    if tag_keys:
        data = _tagged_data(codec, key, value)
    else:
        data = (codec.at(key) if codec.signed else codec).dumps(value)
    if timeout == 0:
        # Django's add(timeout=0) reports whether the key was free and leaves nothing behind.
        return not (yield from _op_has(tags, key))
    if tag_keys:
        data = _wrapped(codec, key, (yield from _op_header(tag_keys, timeout)), data)
    if (yield _set_command(key, data, timeout, "NX")):
        return True
    return tags is not None and (yield from _op_replace_invalid(key, data, timeout))


def _op_replace_invalid(key: str, data: Any, timeout: int | None) -> Operation[bool]:
    """After a ``SET NX`` found the key taken (OPTIONS tags): a tagged entry whose tags were
    invalidated is not there, and is replaced, unless another value came meanwhile."""
    current = yield ("GET", key)
    if current is None or (yield from _op_checked([current]))[0] is not None:
        return False
    expiry = () if timeout is None else ("EX", timeout)
    return bool((yield _SWAP([key], [current, data, *expiry])))


def _op_replace_valid(key: str, data: Any, timeout: int | None) -> Operation[bool]:
    """``SET XX`` with OPTIONS tags: a tagged entry whose tags were invalidated is not there,
    and is not written over. (Three tries against writers in between, then ``SET XX``.)"""
    expiry = () if timeout is None else ("EX", timeout)
    for _ in range(3):
        current = yield ("GET", key)
        if current is None or (yield from _op_checked([current]))[0] is None:
            return False
        if (yield _SWAP([key], [current, data, *expiry])):
            return True
    return bool((yield _set_command(key, data, timeout, "XX")))


def _op_get(
    codec: _Codec, key: str, default: Any, tally: list[int], tags: _Tags | None = None
) -> Operation[Any]:
    data = (yield ("GET", key)) if tags is None else (yield from _op_read(tags, key))
    if data is not None:
        try:
            value = (codec.at(key) if codec.signed else codec).loads(data)
        except _Unchecked as tagged:
            value = yield from _op_unchecked(tagged, data)
            if value is _MISSING:
                tally[_MISSES] += 1
                return default
        if value is not _MISSING:
            tally[_HITS] += 1
            return value
        _forged(key)
    tally[_MISSES] += 1
    return default


def _found(codec: _Codec, key: str, data: bytes | None) -> Any:
    """The value of ``data`` read at ``key``; ``_MISSING`` if none, or if it is not signed.
    (A tagged value read without OPTIONS tags raises ``_Unchecked``: see ``_op_found``.)"""
    if data is None:
        return _MISSING
    value = codec.loads(data)
    if value is _MISSING:
        _forged(key)
    return value


def _op_unchecked(tagged: _Unchecked, data: bytes) -> Operation[Any]:
    """The value of a tagged entry read without OPTIONS tags, if its tags are valid (one
    MGET of them); else ``_MISSING``."""
    return _MISSING if (yield from _op_checked([data]))[0] is None else tagged.value


def _op_found(codec: _Codec, key: str, data: bytes | None) -> Operation[Any]:
    """``_found`` of what a plain GET read (not a script): a tagged value is ``_MISSING`` if
    its tags were invalidated (one MGET of them), with or without OPTIONS tags."""
    if data is None or not _tag_pairs(data):
        return _found(codec, key, data)
    if (yield from _op_checked([data]))[0] is None:
        return _MISSING
    try:
        return _found(codec, key, data)
    except _Unchecked as tagged:
        return tagged.value


def _op_set(
    codec: _Codec,
    key: str,
    value: Any,
    timeout: int | None,
    nx: bool,
    xx: bool,
    tags: _Tags | None = None,
    tag_keys: list[str] | None = None,
) -> Operation[bool | None]:
    """Django's set (returns None); with ``nx`` or ``xx``, whether the value was written."""
    if tag_keys:
        data = _tagged_data(codec, key, value)
    else:
        data = (codec.at(key) if codec.signed else codec).dumps(value)
    if timeout == 0:  # an instant expiry: nothing is stored
        if nx:
            return not (yield from _op_has(tags, key))
        present = (yield from _op_has(tags, key)) if xx and tags is not None else False
        existed = yield from _op_bool_dropping_copy(("DEL", key))
        return (present if tags is not None else existed) if xx else None
    if tag_keys:
        data = _wrapped(codec, key, (yield from _op_header(tag_keys, timeout)), data)
    if xx and tags is not None:
        return (yield from _op_replace_valid(key, data, timeout))
    flags = ("NX",) if nx else ("XX",) if xx else ()
    written = yield _set_command(key, data, timeout, *flags)
    if nx and not written and tags is not None:
        return (yield from _op_replace_invalid(key, data, timeout))
    return bool(written) if flags else None


def _op_bool(*command: Any) -> Operation[bool]:
    """A command whose integer reply means yes or no (DEL, EXISTS, EXPIRE, PERSIST, ...)."""
    return bool((yield command))


def _op_exists(key: str, tally: list[int], tags: _Tags | None = None) -> Operation[bool]:
    if (yield ("EXISTS", key)) if tags is None else (yield from _op_has(tags, key)):
        tally[_HITS] += 1
        return True
    tally[_MISSES] += 1
    return False


def _op_get_many(
    codec: _Codec, key_map: dict[str, Any], tally: list[int], tags: _Tags | None = None
) -> Operation[dict[Any, Any]]:
    if not key_map:
        return {}
    if tags is None:
        replies = yield ("MGET", *key_map)
    elif tags.script:
        replies = yield _TAGGED_MGET(list(key_map), [])
    else:
        replies = yield from _op_checked((yield ("MGET", *key_map)))
    try:
        values = codec.loads_many(replies, list(key_map))
    except _Unchecked:  # tagged values, read without OPTIONS tags: their tags checked
        values = []
        for key, data in zip(key_map, replies, strict=True):
            values.append((yield from _op_found(codec.at(key), key, data)))
        # (Forged values were logged by _op_found; invalidated ones are no forgery.)
        replies = [
            None if value is _MISSING else data for data, value in zip(replies, values, strict=True)
        ]
    found = {
        user_key: value
        for user_key, value in zip(key_map.values(), values, strict=True)
        if value is not _MISSING
    }
    if codec.signed:
        for key, data, value in zip(key_map, replies, values, strict=True):
            if data is not None and value is _MISSING:
                _forged(key)
    tally[_HITS] += len(found)
    tally[_MISSES] += len(key_map) - len(found)
    return found


def _op_set_many(
    codec: _Codec, data: dict[str, Any], timeout: int | None, tag_keys: list[str] | None = None
) -> Operation[list[Any]]:
    if not data:
        return []
    if tag_keys:
        encoded = [(key, _tagged_data(codec, key, value)) for key, value in data.items()]
        if timeout != 0:
            header = yield from _op_header(tag_keys, timeout)
            encoded = [(key, _wrapped(codec, key, header, value)) for key, value in encoded]
    elif codec.signed:
        encoded = [(key, codec.at(key).dumps(value)) for key, value in data.items()]
    else:
        dumps = codec.dumps
        encoded = [(key, dumps(value)) for key, value in data.items()]
    if timeout == 0:
        yield ("DEL", *data)
    elif timeout is None:
        yield ("MSET", *[item for pair in encoded for item in pair])
    else:
        yield [("SET", key, value, "EX", timeout) for key, value in encoded]
    return []


def _op_bool_dropping_copy(command: tuple[Any, ...]) -> Operation[bool]:
    """``command`` (DEL, EXPIRE by 0, ...) that removes its key, with the key's stale copy
    (``get_or_set``): the value it held is gone. One round trip; whether the key was there."""
    reply, _ = yield [command, ("DEL", command[1] + _STALE_SUFFIX)]
    return bool(reply)


def _op_delete_many(keys: list[str]) -> Operation[None]:
    if keys:
        yield ("DEL", *keys)


def _op_incr(key: str, delta: int, create: bool, tags: _Tags | None = None) -> Operation[int]:
    if tags is not None:
        return (yield from _op_incr_tagged(key, delta, create))
    if create:
        return int((yield ("INCRBY", key, delta)))
    value = yield _INCR_EXISTING([key], [delta])
    if value is None:
        _key_not_found(key)
    return int(value)


def _op_incr_tagged(key: str, delta: int, create: bool) -> Operation[int]:
    """incr with OPTIONS tags: a tagged entry whose tags were invalidated is not there
    (ValueError, or created from 0); a valid one is no integer (INCRBY's error)."""
    reply = yield _INCR_UNTAGGED([key], [delta, int(create)])
    if type(reply) is list:  # a value that starts with a NUL: tagged, perhaps
        if (yield from _op_checked(reply))[0] is not None:
            raise redis.ResponseError("value is not an integer or out of range")
        if not create:
            _key_not_found(key)
        if (yield _SWAP([key], [reply[0], delta])):
            return delta
        return int((yield ("INCRBY", key, delta)))  # another value came meanwhile
    if reply is None:
        _key_not_found(key)
    return int(reply)


def _op_move_present(
    tags: _Tags, old_key: str, user_key: Any, move: Operation[Any]
) -> Operation[Any]:
    """incr_version with OPTIONS tags: an entry whose tags were invalidated is not there."""
    if not (yield from _op_has(tags, old_key)):
        _key_not_found(user_key)
    return (yield from move)


_DEFAULT_LOCK_TIMEOUT = 10.0  # OPTIONS stampede_lock_timeout's default


def _window(name: str, seconds: Any) -> float:
    """A stale window (seconds or timedelta), checked where the caller sees it."""
    if isinstance(seconds, datetime.timedelta):
        seconds = seconds.total_seconds()
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {seconds!r}.")
    if not 0 <= seconds < 10**9:  # (NaN too)
        raise ValueError(f"{name} must be 0 or more seconds, not {seconds!r}.")
    return float(seconds)


_PING = ("PING",)


def _pong(replies: list[Any]) -> None:
    """Raise the error a PING got (LOADING, NOAUTH, ...) instead of its PONG."""
    if isinstance(replies[0], Exception):
        raise replies[0]


# What a PING of a replica outside the pools connects with: the pools' credentials and TLS.
_PING_OPTIONS = (
    "username",
    "password",
    "credential_provider",
    "ssl",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "socket_timeout",
    "socket_connect_timeout",
)


def _ping_options(topology: _Topology) -> dict[str, Any]:
    merged = {**topology.config.sync_options, **getattr(topology, "connection_options", {})}
    options = {name: merged[name] for name in _PING_OPTIONS if merged.get(name) is not None}
    options.setdefault("socket_timeout", 5.0)  # a health check never hangs
    options.setdefault("socket_connect_timeout", 5.0)
    return options


def _cluster_replicas(reply: Any) -> list[tuple[str, int]]:
    """The replicas a ``CLUSTER NODES`` reply lists as up."""
    found = []
    for line in _text(reply).splitlines():
        fields = line.split()
        flags = set(fields[2].split(",")) if len(fields) > 2 else set()
        if "slave" in flags and not {"fail", "fail?", "noaddr", "handshake"} & flags:
            host, _, port = fields[1].split("@")[0].rpartition(":")
            found.append((host.strip("[]"), int(port)))
    return found


def _replica_addresses(topology: _Topology) -> list[tuple[str, int]]:
    """The replicas that Sentinel or Cluster lists (LOCATION's replicas are pooled)."""
    if isinstance(topology, _Cluster):
        return _cluster_replicas(_pong_reply(_sync_routed(topology, [("CLUSTER", "NODES")])))
    if isinstance(topology, _Sentinel):
        config = topology.config
        sentinel: Any = redis.sentinel.Sentinel  # (untyped in redis-py)
        manager = sentinel(config.sentinels, sentinel_kwargs=config.sentinel_kwargs)
        try:
            return [(str(h), int(p)) for h, p in manager.discover_slaves(str(topology.service))]
        finally:
            for sentinel in manager.sentinels:
                sentinel.close()
    return []


async def _areplica_addresses(topology: _Topology) -> list[tuple[str, int]]:
    """``_replica_addresses`` on the asyncio path."""
    if isinstance(topology, _Cluster):
        reply = await _async_routed(topology, [("CLUSTER", "NODES")])
        return _cluster_replicas(_pong_reply(reply))
    if isinstance(topology, _Sentinel):
        config = topology.config
        sentinel: Any = redis.asyncio.sentinel.Sentinel  # (untyped in redis-py)
        manager = sentinel(config.sentinels, sentinel_kwargs=config.sentinel_kwargs)
        try:
            found = await manager.discover_slaves(str(topology.service))
            return [(str(h), int(p)) for h, p in found]
        finally:
            for sentinel in manager.sentinels:
                await sentinel.aclose()
    return []


def _pong_reply(replies: list[Any]) -> Any:
    _pong(replies)
    return replies[0]


class _Stale:
    """A stale copy read by ``get_or_set`` (``stale_while_revalidate``, ``stale_if_error``):
    its value, and the seconds since its entry expired."""

    __slots__ = ("age", "value")

    def __init__(self, value: Any, age: float) -> None:
        self.value, self.age = value, age


# A stale copy: its key's, with this suffix (the lock's: _LOCK_SUFFIX). It holds the window it
# was written for, in milliseconds, a NUL, and the entry's data as its key holds it (signed for
# that key); it expires that window after the entry.
_STALE_SUFFIX = "\x00stale"
_LOCK_SUFFIX = "\x00lock"  # get_or_set's stampede lock: its key's name, with this suffix
_INTERNAL_KEYS = (_STALE_SUFFIX.encode(), _LOCK_SUFFIX.encode())  # left out of iter_keys


def _op_stale(
    codec: _Codec, key: str, data: bytes | None, remaining: Any
) -> Operation[_Stale | None]:
    """The stale copy of ``key`` read with its PTTL; None if there is none, its tags were
    invalidated or its signature does not hold."""
    if data is None or not isinstance(remaining, int) or remaining <= 0:
        return None
    window, _, data = data.partition(b"\x00")
    if not window.isdigit():
        return None
    try:
        value = yield from _op_found(codec, key, data)
    except Exception as error:  # written by another serializer, say: no copy to serve
        if key not in _unreadable_copies and len(_unreadable_copies) < 10_000:
            _unreadable_copies.add(key)
            logger.warning("The stale copy of %r could not be read: %r", key, error)
        return None
    if value is _MISSING:
        return None
    return _Stale(value, max(int(window) - remaining, 0) / 1000)


_unreadable_copies: set[str] = set()  # keys whose stale copy could not be read, logged once


def _op_get_or_set(
    codec: _Codec,
    key: str,
    default: Any,
    timeout: int | None,
    lock_timeout: float | None,
    undo: list[tuple[Any, ...]],
    computed: list[Any],
    tally: list[int],
    tags: _Tags | None = None,
    tag_keys: list[str] | None = None,
    windows: tuple[float, float] = (0, 0),
) -> Operation[Any]:
    """One GET on a hit. On a miss with a callable default and stampede protection on, one
    caller computes under a short lock while the others wait for its value (bounded by the
    lock's timeout) and compute it themselves if it does not come. The lock's release waits
    in ``undo`` while it is held; a computed value is kept in ``computed``. With tags, their
    tokens are read before the value is computed: a tag invalidated meanwhile leaves the
    value stored invalid.

    ``windows``, (stale_while_revalidate, stale_if_error) in seconds: the value is copied to
    a stale key that outlives it by the longer window. Within the first after the value
    expired, a caller that finds its copy returns it at once; the one that takes the lock
    computes (on the asyncio path in a task of its own: ``_Background``). Within the second,
    a computation that raises returns the copy instead (logged once per key and copy)."""
    codec = codec.at(key)
    data = (yield ("GET", key)) if tags is None else (yield from _op_read(tags, key))
    try:
        value = _found(codec, key, data)
    except _Unchecked as tagged:  # read without OPTIONS tags: its tags checked
        value = yield from _op_unchecked(tagged, cast(bytes, data))
    if value is not _MISSING:
        tally[_HITS] += 1
        return value
    tally[_MISSES] += 1  # whoever computes the value: this call did not find it
    window = max(windows) if timeout else 0
    store = functools.partial(
        _op_computed, codec, key, default, timeout, computed, tag_keys, window
    )
    if timeout == 0 or lock_timeout is None or not callable(default):
        return (yield from store())
    lock, token = key + _LOCK_SUFFIX, os.urandom(8).hex()
    release = _RELEASE_LOCK([lock], [token])
    undo.append(release)  # from the moment the SET may have taken it
    # Lock, then look again: a caller that stored the value and let go since our GET wins.
    lock_command = ("SET", lock, token, "PX", int(lock_timeout * 1000), "NX")
    stale: _Stale | None = None
    if window:
        shadow = key + _STALE_SUFFIX
        locked, data, kept, remaining = yield [
            lock_command,
            ("GET", key),
            ("GET", shadow),
            ("PTTL", shadow),
        ]
    else:
        locked, data = yield [lock_command, ("GET", key)]
    if not locked:
        undo.clear()
    value = yield from _op_found(codec, key, data)
    if value is not _MISSING:
        if locked:
            undo.clear()
            yield release
        return value
    if window:
        stale = yield from _op_stale(codec, key, kept, remaining)
    serve = stale is not None and stale.age <= windows[0]  # stale_while_revalidate
    rescue = stale if stale is not None and stale.age <= windows[1] else None
    if locked:
        if serve:
            refreshing = _op_refresh(store, rescue, undo)
            refresh = Plan("get_or_set_refresh", refreshing, _none, undo)
            if (yield _Background(refresh)) is not _INLINE:  # it holds the lock now
                return cast(_Stale, stale).value
        value = yield from store(rescue)
        undo.clear()
        yield release
        return value
    if serve:
        return cast(_Stale, stale).value
    deadline, pause = None, 0.005
    while True:
        now = yield _Sleep(pause)
        deadline = now - pause + lock_timeout if deadline is None else deadline
        data, locked = yield [("GET", key), ("EXISTS", lock)]
        value = yield from _op_found(codec, key, data)
        if value is not _MISSING:
            return value
        if not locked or now >= deadline:  # the holder failed, or is too slow: compute here
            return (yield from store(rescue))
        pause = min(pause * 2, 0.1)


def _op_refresh(
    store: Callable[[_Stale | None], Operation[Any]],
    rescue: _Stale | None,
    undo: list[tuple[Any, ...]],
) -> Operation[Any]:
    """A stale value's recomputation under its lock, which it lets go (``undo``)."""
    value = yield from store(rescue)
    yield undo.pop()
    return value


# A computation's errors get_or_set logged, by key: when the copy served instead expired
# (time.monotonic()), which tells one copy from the next. Bounded; dict operations need no
# lock under the GIL.
_stale_errors: dict[str, float] = {}


def _rescued(key: str, stale: _Stale, error: Exception) -> Any:
    """The stale value served for a computation that raised, logged once per key and copy."""
    expired = time.monotonic() - stale.age
    last = _stale_errors.get(key)
    if last is None or abs(expired - last) > 1.0:  # another copy (a second's leeway)
        if len(_stale_errors) >= 10_000:
            _stale_errors.clear()
        logger.warning(
            "get_or_set(%r): the default raised; served the value that expired %.1f s ago "
            "(stale_if_error).",
            key,
            stale.age,
            exc_info=error,
        )
        _stale_errors[key] = expired
    return stale.value


def _op_computed(
    codec: _Codec,
    key: str,
    default: Any,
    timeout: int | None,
    computed: list[Any],
    tag_keys: list[str] | None,
    window: float = 0,
    rescue: _Stale | None = None,
) -> Operation[Any]:
    """Compute ``default`` (the tags' tokens read first) and store it, unless another value
    came meanwhile (as with add(), theirs wins). With a stale ``window``, a copy of it too;
    with a stale value to ``rescue``, one the computation's error is served instead of."""
    if tag_keys and timeout != 0:  # the tags' keys live as long as the stale copy too
        header = yield from _op_header(tag_keys, timeout and timeout + math.ceil(window))
    else:
        header = b""
    if callable(default):
        value = yield _Compute(default, rescue is not None)
        if type(value) is _Failed:
            return _rescued(key, cast(_Stale, rescue), value.error)
    else:
        value = default
    computed.append(value)
    if timeout == 0:
        return value
    if header:
        data = _wrapped(codec, key, header, _tagged_data(codec, key, value))
    else:
        data = codec.dumps(value)
    if window and timeout:
        kept = _stale_copy(key, data, window, timeout)
        current = (yield [kept, _GET_OR_STORE([key], [data, timeout])])[1]
    else:
        current = yield _GET_OR_STORE([key], [data, timeout or 0])
    found = yield from _op_found(codec, key, current)
    if found is _MISSING and current is not None:
        # Not signed, or its tags invalidated: ours replaces it, unless another came since.
        expiry = () if timeout is None else ("EX", timeout)
        yield _SWAP([key], [current, data, *expiry])
    elif current is not None and window and timeout:  # theirs stays: no copy of ours
        yield ("DEL", key + _STALE_SUFFIX)
    return value if found is _MISSING else found


def _stale_copy(key: str, data: Any, window: float, timeout: int) -> tuple[Any, ...]:
    """The SET of ``key``'s stale copy: the window in ms, a NUL, the data as the key holds
    it; it expires ``window`` after the value's ``timeout``."""
    raw = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data).encode()
    held = b"%d\x00%b" % (int(window * 1000), raw)  # (an int: stored as its digits)
    return ("SET", key + _STALE_SUFFIX, held, "PX", int((timeout + window) * 1000))


def _op_move(
    codec: _Codec, old_key: str, new_key: str, user_key: Any, atomic: bool
) -> Operation[None]:
    """Move a value to another key, keeping its expiry: one atomic round trip, or two on
    Redis Cluster (the keys lie in different slots, out of reach of one script) and for a
    signed value (signed again for its new key). The old key's stale copy (``get_or_set``)
    goes in the same round trip."""
    old_copy = old_key + _STALE_SUFFIX
    if atomic and not codec.signed:  # (the script last: sent again alone after NOSCRIPT)
        if not (yield [("DEL", old_copy), _RENAME_EXISTING([old_key, new_key], [])])[1]:
            _key_not_found(user_key)
        return
    data, remaining = yield [("GET", old_key), ("PTTL", old_key)]
    if data is not None and isinstance(codec, _SignedCodec):
        payload = codec.at(old_key).payload(data)
        if payload is None:
            _forged(old_key)
        elif not _reads_as_int(payload):  # a raw int stays raw (incr needs it)
            payload = codec.at(new_key).sign(payload)
        data = payload
    if data is None or remaining == -2:  # (gone between the GET and the PTTL)
        _key_not_found(user_key)
    # PTTL 0: under a millisecond left, which the new key keeps (it would never expire).
    expiry = () if remaining == -1 else ("PX", max(remaining, 1))
    yield [("SET", new_key, data, *expiry), ("DEL", old_key, old_copy)]


def _op_then(operation: Operation[Any], result: _T) -> Operation[_T]:
    """``operation``, returning ``result`` instead of its own."""
    yield from operation
    return result


def _op_ttl(command: str, key: str) -> Operation[int | None]:
    """django-redis's convention: 0 for a missing key, None for one that never expires."""
    remaining = yield (command, key)
    if remaining == -2:
        return 0
    return None if remaining == -1 else int(remaining)


def _op_scan(
    pattern: str, count: int, convert: Callable[[Any], Any], cursor: int
) -> Operation[_Page]:
    """A page of the keys matching ``pattern``, ``convert``-ed: one SCAN (never KEYS)."""
    cursor, keys = yield ("SCAN", cursor, "MATCH", pattern, "COUNT", count)
    return int(cursor), [
        convert(key) for key in keys if convert is _unchanged or not _internal(key)
    ]


def _internal(key: bytes | str) -> bool:
    """Whether ``key`` is get_or_set's lock or stale copy of a key."""
    return (key if type(key) is bytes else str(key).encode()).endswith(_INTERNAL_KEYS)


def _op_then_set(operation: Operation[list[Any]]) -> Operation[set[Any]]:
    return set((yield from operation))


def _op_every_page(page: Callable[[int], Operation[_Page]]) -> Operation[list[Any]]:
    """Everything an iteration finds, page after page (a round trip each)."""
    cursor, found = -1, []
    while cursor:
        cursor, more = yield from page(max(cursor, 0))
        found += more
    return found


def _op_delete_pattern(pattern: str, count: int) -> Operation[int]:
    """UNLINK the keys matching ``pattern`` page by page (one round trip each); how many."""
    cursor, deleted = -1, 0
    while cursor:
        cursor, keys = yield from _op_scan(pattern, count, _unchanged, max(cursor, 0))
        if keys:
            deleted += yield ("UNLINK", *keys)
    return deleted


def _unchanged(key: Any) -> Any:
    return key


# Sets, hashes and sorted sets (django-redis's data-structure methods). Members and hash
# values go through the codec like cache values; fields, scores and counts do not. Replies
# come in RESP2 or RESP3 shapes (OPTIONS "protocol"), which these operations both take.


def _op_apply(convert: Callable[[Any], _T], *command: Any) -> Operation[_T]:
    """One command, its reply made the result by ``convert``."""
    return convert((yield command))


def _op_converged(convert: Callable[[Any], _T], pairs: list[Any], *command: Any) -> Operation[_T]:
    """``command`` on a sorted set, after its members' 2.0 forms in ``pairs`` (old, new, ...)
    took django-redis's form, in the same round trip."""
    if not pairs:
        return convert((yield command))
    replies = yield [_ZCONVERGE.whole([command[1]], pairs), command]
    return convert(replies[1])


def _op_round_trip(
    convert: Callable[[list[Any]], _T], commands: list[tuple[Any, ...]]
) -> Operation[_T]:
    """``commands`` in one round trip, their replies made the result by ``convert``."""
    return convert((yield commands))


def _either(convert: Callable[[Any], _T]) -> Callable[[list[Any]], _T]:
    """``convert`` of the first reply that is not None: a member found in either form."""
    return lambda replies: convert(next((reply for reply in replies if reply is not None), None))


def _members(codec: _Codec, reply: Any) -> list[Any]:
    loads = codec.loads
    members = [loads(member) for member in reply or ()]
    return [m for m in members if m is not _MISSING] if codec.signed else members


def _member_set(codec: _Codec, reply: Any) -> set[Any]:
    loads = codec.loads
    members = {loads(member) for member in reply or ()}
    members.discard(_MISSING)  # a member without a valid signature (OPTIONS sign_values)
    return members


def _optional_member(codec: _Codec, reply: Any) -> Any:
    value = None if reply is None else codec.loads(reply)
    return None if value is _MISSING else value


def _pairs(reply: Any) -> Iterable[Any]:
    """A reply of pairs as pairs: RESP3 nests them (or maps them), RESP2 lays them flat."""
    if isinstance(reply, dict):
        return reply.items()
    if not reply:
        return ()
    if isinstance(reply[0], (list, tuple)):
        return cast(Iterable[Any], reply)
    flat = iter(reply)
    return zip(flat, flat, strict=False)


def _score(reply: Any) -> float | None:
    """A score: RESP3 sends a double, RESP2 a bulk string."""
    return None if reply is None else float(reply)


def _scored(
    codec: _Codec, withscores: bool, score_cast_func: Callable[[float], Any], reply: Any
) -> list[Any]:
    """Members, or with scores (``score_cast_func`` of each, as a float) (member, score)."""
    if not withscores:
        return _members(codec, reply)
    loads = codec.loads
    scored = [(loads(member), score_cast_func(float(score))) for member, score in _pairs(reply)]
    return [pair for pair in scored if pair[0] is not _MISSING] if codec.signed else scored


def _popped(codec: _Codec, count: int | None, reply: Any) -> Any:
    """ZPOPMAX/ZPOPMIN: a (member, score) pair, or None; a list of pairs with ``count``."""
    popped = _scored(codec, True, float, reply)
    if count is not None:
        return popped
    return popped[0] if popped else None


def _hash(codec: _Codec, at: Callable[[Any], _Codec], reply: Any) -> dict[str, Any]:
    """HGETALL: each value decoded by the codec ``at`` its field."""
    if not codec.signed:
        loads = codec.loads
        return {_text(field): loads(value) for field, value in _pairs(reply)}
    fields = {_text(field): at(field).loads(value) for field, value in _pairs(reply)}
    return {f: v for f, v in fields.items() if v is not _MISSING}


def _field_bytes(field: Any, encoding: str) -> bytes:
    """A hash field as Redis holds it: as redis-py's encoder sends it."""
    if isinstance(field, (bytes, memoryview)):
        return bytes(field)
    if isinstance(field, (int, float)):
        return repr(field).encode()
    return cast(str, field).encode(encoding)


def _fields(reply: Any) -> list[str]:
    return [_text(field) for field in reply or ()]


def _optional_members(codecs: list[_Codec], reply: Any) -> list[Any]:
    """HMGET: each value decoded by its field's codec."""
    return [_optional_member(codec, value) for codec, value in zip(codecs, reply, strict=True)]


def _bools(reply: Any) -> list[bool]:
    return [bool(each) for each in reply]


def _optional_int(reply: Any) -> int | None:
    return None if reply is None else int(reply)


def _ranked(reply: Any) -> list[Any] | None:
    """ZRANK ... WITHSCORE: [rank, score], or None."""
    return None if reply is None else [int(reply[0]), float(reply[1])]


def _signed_algebra(
    codec: _SignedCodec, method: str, keys: list[str], replies: list[Any]
) -> set[bytes]:
    """SINTER, SUNION or SDIFF (``method``, maybe with STORE) of signed sets, on what the
    unsigned codec stored: each set's members are signed for their own set."""
    payloads = []
    for key, members in zip(keys, replies, strict=True):
        view = codec.at(key, b"s")
        found = {view.payload(member) for member in members or ()}
        if None in found:
            found.discard(None)
            _forged(key)
        payloads.append(cast("set[bytes]", found))
    first, *others = payloads
    if method.startswith("sinter"):
        return first.intersection(*others)
    return first.union(*others) if method.startswith("sunion") else first.difference(*others)


def _op_signed_algebra(codec: _SignedCodec, method: str, keys: list[str]) -> Operation[set[Any]]:
    """Set algebra where each set's members are signed for it: the members of every set in
    one round trip, compared here (the server would find no member in two sets)."""
    replies = yield [("SMEMBERS", key) for key in keys]
    return {codec._decode(payload) for payload in _signed_algebra(codec, method, keys, replies)}


def _op_signed_store(codec: _SignedCodec, method: str, keys: list[str]) -> Operation[int]:
    """SINTERSTORE and its kin on signed sets: computed as ``_op_signed_algebra``, then the
    members signed for the destination replace it at once (a script). Two round trips: a
    change to a source set in between is not seen."""
    destination, *sources = keys
    replies = yield [("SMEMBERS", key) for key in sources]
    view = codec.at(destination, b"s")
    members = [
        payload if _reads_as_int(payload) else view.sign(payload)  # raw ints stay raw
        for payload in _signed_algebra(codec, method, sources, replies)
    ]
    return int((yield _REPLACE_SET([destination], members)))


def _op_sscan(
    codec: _Codec, key: str, count: int, match: str | None, cursor: int
) -> Operation[_Page]:
    """A page of a set's members: one SSCAN. ``match`` is a glob on the decoded members
    (str members only): Redis would match it against their pickles."""
    cursor, members = yield ("SSCAN", key, cursor, "COUNT", count)
    forged = codec.forged
    found = _members(codec, members)
    if codec.forged != forged:
        _forged(key)
    if match is not None:
        found = [m for m in found if isinstance(m, str) and fnmatch.fnmatchcase(m, match)]
    return int(cursor), found


# ---------------------------------------------------------------------------
# The policy: one runner of a plan, with no I/O; the shells below perform what it asks
# ---------------------------------------------------------------------------


# What the policy asks of a shell: a pause, a computation, or a send ``(index, commands)`` of
# commands together on the client at ``index`` (0 takes writes), whose reply is their replies
# in order (an error reply as its object); the shell raises only when the exchange failed.
_Send = tuple[int, list[tuple[Any, ...]]]
Request = Union[_Send, _Sleep, _Compute, _Background]  # noqa: UP007


class _Trip:
    """A round trip as the features see it: where it goes, what goes out, their notes."""

    __slots__ = ("again", "commands", "index", "plan", "probe", "ticket", "wire")

    def __init__(self, plan: Plan[Any], index: int, commands: list[tuple[Any, ...]]) -> None:
        self.plan, self.index, self.commands, self.wire = plan, index, commands, commands
        self.ticket: Any = None  # the client-side store's read in flight
        self.probe: Any = None  # the circuit breaker this trip probes
        self.again = False  # it failed, and goes out once more at once


class _Feature:
    """An optional feature, built once per configuration: the policy shows it a call as it
    begins and ends, and each round trip as it goes out, and its replies or its error."""

    trips = True  # whether it sees round trips, or only calls
    # The round trips it sees whole (a _Trip: sending, replied, failed), by their first
    # command's name; None: all. Those it does not, it sees as their commands (``passed``).
    trip_names: frozenset[str] | None = None

    def begin(self, plan: Plan[Any]) -> None:
        """A call begins."""

    def passed(self, commands: list[tuple[Any, ...]]) -> None:
        """A round trip it does not see whole went out: answered, failed or cancelled."""

    def sending(self, trip: _Trip) -> None:
        """A round trip goes out: send it elsewhere (``index``), more (``wire``), or raise."""

    def replied(self, trip: _Trip, replies: list[Any]) -> list[Any]:
        """The replies came: what the operation receives."""
        return replies

    def failed(self, trip: _Trip, error: BaseException) -> None:
        """The round trip failed, or was cancelled, with ``error``."""

    def end(self, plan: Plan[Any], error: BaseException | None, ignored: bool) -> None:
        """The call ended: with ``error`` (None if it succeeded), which was ``ignored``."""


_ResponseError = redis.ResponseError
_NoScriptError = redis.exceptions.NoScriptError

# Redis is down, unreachable or too slow: what ignore_exceptions covers. Wrong credentials
# are a configuration error and always raise.
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
_MASTER_NOT_FOUND = (redis.sentinel.MasterNotFoundError, redis.asyncio.sentinel.MasterNotFoundError)


def _wrong_credentials(error: BaseException) -> bool:
    """Whether ``error`` says the credentials are wrong: a configuration error, never ignored.
    (redis-py's Sentinel raises MasterNotFoundError, with each sentinel's error in its text.)"""
    if isinstance(error, _MASTER_NOT_FOUND):
        return "AuthenticationError" in str(error)
    return isinstance(error, redis.AuthenticationError)


# A connection dropped while a value this large went out may mean the server refused its size.
_LARGE_VALUE = 1 << 20
_BULK_LIMIT = ("CONFIG", "GET", "proto-max-bulk-len")


def _largest_value(commands: list[tuple[Any, ...]]) -> int:
    return max((len(a) for c in commands for a in c if isinstance(a, bytes)), default=0)


def _refuse_oversized(commands: list[tuple[Any, ...]], limit_reply: Any, error: Any) -> None:
    """Raise a ValueError if ``commands`` carry a value over the server's size limit (Redis
    answers "invalid bulk length" and closes the connection: it would read as an outage)."""
    reply = dict(limit_reply) if isinstance(limit_reply, dict) else {}
    if isinstance(limit_reply, list):
        reply = dict(zip(limit_reply[::2], limit_reply[1::2], strict=False))
    limit = int(next(iter(reply.values()), 0) or 0)
    size = _largest_value(commands)
    if (limit and size > limit) or "invalid bulk length" in str(error):
        raise ValueError(
            f"A value of {size} bytes is larger than this Redis server accepts "
            f"(proto-max-bulk-len {limit or 'unknown'}): it refused the value and closed the "
            "connection."
        ) from error


class _Policy:
    """Runs plans of one configuration and path, with no I/O: routing, a second attempt after
    a dead connection, the size check, undo, the ignore_exceptions fallback, the features'
    hooks. A shell performs each request; a failed one is thrown back in (see ``finally``)."""

    def __init__(self, topology: _Topology, features: tuple[_Feature, ...], prefix: str) -> None:
        self.config = topology.config
        # With a client-side store, reads go where its tracking connection is.
        store = any(isinstance(feature, (_Store, _ClusterStore)) for feature in features)
        self.readers = 0 if store else topology.readers
        self.features = features
        self.begins = tuple(f for f in features if type(f).begin is not _Feature.begin)
        self.ends = tuple(f for f in features if type(f).end is not _Feature.end)
        self.trip_hooks = tuple(feature for feature in features if feature.trips)
        # The round trips a hook sees whole (the others need no _Trip); None: all of them.
        self.whole: frozenset[str] | None = frozenset()
        for hook in self.trip_hooks:
            names = hook.trip_names
            self.whole = None if names is None or self.whole is None else self.whole | names
        self.prefix = prefix  # what the methods of this path start with: "a" for asyncio

    def run(self, plan: Plan[_T]) -> Generator[Request, Any, _T]:
        """The plan's result, or its fallback when Redis is unavailable and errors ignored."""
        ignored = False
        error: BaseException | None = None
        for feature in self.begins:
            feature.begin(plan)
        operation, reply = plan.operation, None
        try:
            while True:
                try:
                    command = operation.send(reply)
                except StopIteration as done:
                    result: _T = done.value
                    return result
                if type(command) is tuple:
                    reply = (yield from self._trip(plan, [command]))[0]
                elif type(command) is list:
                    reply = yield from self._trip(plan, command)
                else:  # a pause, a computation
                    reply = yield cast(Request, command)
        except GeneratorExit:  # the shell dropped the call: nothing more can go out
            raise
        except BaseException as failure:  # cancelled or timed out too: what it holds goes
            error = failure
            yield from self._undo(plan)
            ignored = self._ignores(plan, failure)
            return cast(_T, (yield _Compute(plan.fallback)))
        finally:
            for feature in self.ends:
                feature.end(plan, error, ignored)

    def _trip(
        self, plan: Plan[Any], commands: list[tuple[Any, ...]], attempt: int = 1
    ) -> Generator[Request, Any, list[Any]]:
        """The replies of a round trip, sent again once after a dead connection if the table
        allows (a replica's read, to the first server); an error reply is raised."""
        index = 0
        if self.readers and attempt == 1 and not plan.primary and _replica_safe(commands):
            index = random.randint(1, self.readers)
        hooks, trip = self.trip_hooks, None
        if hooks and (self.whole is None or commands[0][0] in self.whole):
            trip = self._sending(plan, index, commands)
        try:
            replies = yield (index, commands) if trip is None else (trip.index, trip.wire)
        except BaseException as error:
            again = attempt == 1 and _resendable(commands, error)
            if trip is not None:  # a replica's failure counts: the read goes elsewhere
                self._failed(trip, error, again and not trip.index)
            else:
                for hook in hooks:
                    hook.passed(commands)
            if isinstance(error, redis.RedisError):
                yield from self._refuse_if_oversized(plan, commands, error)
            if not again:
                raise
            return (yield from self._trip(plan, commands, 2))
        if trip is not None:
            for hook in hooks:
                replies = hook.replied(trip, replies)
        else:
            for hook in hooks:
                hook.passed(commands)
        for reply in replies:
            if isinstance(reply, _ResponseError):
                at = replies.index(reply)  # (no enumerate: this loop runs on every call)
                if 0 < at == len(commands) - 1 and isinstance(reply, _NoScriptError):
                    # The others ran: the script that closes the pipeline goes again alone.
                    last = yield from self._error_reply(plan, commands[at:], reply)
                    return [*replies[:at], *last]
                return (yield from self._error_reply(plan, commands, reply))
        return replies  # type: ignore[no-any-return]

    def _sending(self, plan: Plan[Any], index: int, commands: list[tuple[Any, ...]]) -> _Trip:
        trip = _Trip(plan, index, commands)
        for hook in self.trip_hooks:
            hook.sending(trip)
        return trip

    def _failed(self, trip: _Trip, error: BaseException, again: bool) -> None:
        trip.again = again
        for hook in self.trip_hooks:
            hook.failed(trip, error)

    def _error_reply(
        self, plan: Plan[Any], commands: list[tuple[Any, ...]], error: redis.ResponseError
    ) -> Generator[Request, Any, list[Any]]:
        """A script the server does not hold goes again in full; other errors are raised."""
        if isinstance(error, redis.exceptions.NoScriptError) and len(commands) == 1:
            name, sha, *rest = commands[0]
            whole = "EVAL_RO" if name == "EVALSHA_RO" else "EVAL"
            return (yield from self._trip(plan, [(whole, _SCRIPTS[sha], *rest)]))
        yield from self._refuse_if_oversized(plan, commands, error)
        raise error

    def _refuse_if_oversized(
        self, plan: Plan[Any], commands: list[tuple[Any, ...]], error: redis.RedisError
    ) -> Generator[Request, Any, None]:
        if _largest_value(commands) > _LARGE_VALUE:
            _refuse_oversized(commands, (yield from self._try(plan, _BULK_LIMIT)), error)

    def _try(self, plan: Plan[Any], command: tuple[Any, ...]) -> Generator[Request, Any, Any]:
        """``command``'s reply, or None if it fails: for what is done on the way out."""
        try:
            return (yield from self._trip(plan, [command]))[0]
        except redis.RedisError:
            return None

    def _undo(self, plan: Plan[Any]) -> Generator[Request, Any, None]:
        """Send, best effort, what the operation holds (a lock) and would have let go."""
        while plan.undo:
            yield from self._try(plan, plan.undo.pop())

    def _ignores(self, plan: Plan[Any], error: BaseException) -> bool:
        """True (logged) if ``error`` is an outage and errors are ignored; else raise it."""
        config = self.config
        if not (isinstance(error, _UNAVAILABLE) and config.ignore_exceptions and plan.ignorable):
            raise error
        if _wrong_credentials(error):  # a configuration error, never ignored
            raise error
        if config.log_ignored_exceptions and type(error) is not _CircuitOpen:
            config.logger.warning(
                "Redis unavailable in %s, ignored: %s", self.prefix + plan.method, error
            )
        plan.operation.close()
        return True


# ---------------------------------------------------------------------------
# Optional feature: the client-side store (OPTIONS "client_cache")
# ---------------------------------------------------------------------------

_IMMUTABLE = frozenset({str, bytes, int, float, bool, type(None)})
_ABSENT = object()  # the store's entry for a key known not to exist
_ENTRY_SIZE = 200  # an entry's tuple and its OrderedDict node, in bytes
_RECHECK = 0.0001  # seconds a reader trusts that no invalidation waits unread
_GATHER = 0.001  # seconds the tracking thread lets invalidations gather before it reads


class _Store(_Feature):
    """The client-side cache of one configuration in this process, shared by threads, event
    loops, both classes and both paths. Each read it would keep asks, on the connection that
    reads and in the same round trip, ``CLIENT TRACKING ON REDIRECT <a connection of its
    own> NOLOOP OPTIN`` and ``CLIENT CACHING YES``: the server tells that connection (read by
    a thread) of every later change to the keys read but those made by the connection that
    read them (this process drops what it writes itself; keys nobody here read cost
    nothing); the entries it names are
    dropped, by that thread or by a reader that finds the invalidations waiting first. The
    store's connections are its own (a connection redirects to one place), and when one of
    those that read is gone, so is what it read: the store is flushed. Every
    ``heartbeat_interval`` it pings and reads the db's marker; entries are served until two
    intervals after the send of the last answered heartbeat, and flushed whenever that
    connection is lost or the marker changed. A read that misses fetches the value and its
    PTTL in one round trip and keeps them (or that the key is absent) only if no write,
    invalidation or flush of the key came meanwhile; every write this process sends drops the
    keys it names, once answered, before anything is next served or kept. Immutable values
    are kept as they are; others as the stored bytes, decoded afresh for each caller."""

    def __init__(
        self,
        topology: _Topology,
        prefix: str | None,
        settings: dict[str, Any],
        broadcast: bool = False,
    ) -> None:
        self.topology = topology
        # A cluster node's (_ClusterStore): BCAST tracking of the prefix, on that node alone;
        # reads need not register, and there is no db to swap (no marker).
        self.broadcast = broadcast
        self.lost: Callable[[], None] | None = None  # told when the tracking connection ends
        self.codec = topology.config.codec
        self.prefix = prefix  # None: every key is tracked (a custom KEY_FUNCTION)
        self.max_entries: int = settings["max_entries"]
        self.max_bytes: int = settings["max_bytes"]
        self.interval: float = settings["heartbeat_interval"]
        self.refused = False  # the server refused tracking: off for this process
        options = topology.config.sync_options
        self.encoding: str = options.get("encoding", "utf-8")  # how keys go to Redis
        self.marker_key = (prefix or "") + _MARKER
        self.heartbeat: list[bytes] = []  # PING and GET of the marker, packed
        self.answer = b""  # their replies, as the server sends them
        self.marking: list[bytes] = []  # SET NX and GET of the marker, packed
        self._fresh_start()

    def _fresh_start(self) -> None:
        """Empty and untracked: at creation, and in a forked child."""
        self.lock = threading.Lock()
        self.entries: collections.OrderedDict[str, tuple[Any, bool, float, int]] = (
            collections.OrderedDict()
        )  # key: (value, whether it is the stored bytes, expiry or 0, size)
        self.bytes = 0
        # key: [reads in flight, the change count at its last change while reads were]
        self.reading: dict[str, list[int]] = {}
        self.changes = 0  # changes of keys read meanwhile, counted: a read keeps what it
        # found only if its key did not change after it began (not: while any read was on)
        self.epoch = 0  # bumped by every flush: reads begun before it store nothing
        self.valid_until = 0.0  # time.monotonic() past which nothing is served
        self.tracker: threading.Thread | None = None
        self.retry_at = 0.0
        self.connected = False
        # What the writes this process sent and had answered changed, not dropped yet.
        self.writes: collections.deque[Any] = collections.deque()
        self.draining = False  # a thread is reading the tracking connection
        self.taking = threading.Lock()  # held by the thread that reads it
        self.buffer = bytearray()  # what was read of it and not yet taken
        self.heard: list[Any] = []  # the heartbeat's replies, once read
        self.more: Callable[[], bool] = bool  # whether bytes wait on it (under ``taking``)
        self.sock: socket.socket | None = None  # the tracking connection's (a parent's: not)
        self.stopping = False  # stop() ends the tracking thread: its end is not a loss
        self.recheck_at = 0.0  # time.monotonic() after which a reader looks at that socket
        self.marker: bytes | None = None  # the db's marker value, as the last heartbeat saw it
        # CLIENT TRACKING ON REDIRECT <the tracking connection> NOLOOP OPTIN, sent with each
        # read the store would keep, and the ids of the connections that sent it: if one is
        # gone, the keys it read would change unseen, and the store is flushed.
        # (BCAST: none; None: not tracking.)
        self.register: list[tuple[Any, ...]] | None = None
        self.registered: set[int] = set()
        self.hits = self.misses = self.invalidations = self.flushes = 0
        self.beat_at: float | None = None  # time.monotonic() of the last answered heartbeat

    # Served from memory ---------------------------------------------------

    def lookup(self, key: str) -> Any:
        """The value of ``key``, ``_ABSENT`` if the key is known not to exist, or ``_MISSING``
        if it must be read from Redis."""
        now = time.monotonic()  # the checks of _entry, inline: the hit path (3% of a hit)
        if now >= self.valid_until:
            self._track_again(now)
            self.misses += 1
            return _MISSING
        if self.draining or (now > self.recheck_at and self._pending(now)):
            self.misses += 1
            return _MISSING
        if self.writes:  # this process's own writes, just answered
            self.settle()
        entry = self.entries.get(key)
        if entry is None or (entry[2] and now >= entry[2]):
            self.misses += 1
            return _MISSING
        try:
            self.entries.move_to_end(key)
        except KeyError:  # dropped meanwhile by another thread: not served
            self.misses += 1
            return _MISSING
        self.hits += 1
        return self.codec.at(key).loads(entry[0]) if entry[1] else entry[0]

    def lookup_many(self, keys: list[str]) -> list[Any] | None:
        """The values of all ``keys`` (``_ABSENT`` for some), or None unless all are known."""
        values = [self.lookup(key) for key in keys]
        return None if any(value is _MISSING for value in values) else values

    def holds(self, key: str) -> bool | None:
        """Whether ``key`` exists, as far as the store knows; None: ask Redis."""
        entry = self._entry(key)
        return None if entry is None else entry[0] is not _ABSENT

    def _entry(self, key: str) -> tuple[Any, bool, float, int] | None:
        """``key``'s entry, if the store may serve it now: tracked, no invalidation waiting,
        this process's own writes dropped, not expired."""
        now = time.monotonic()
        if now >= self.valid_until:
            self._track_again(now)
            return None
        if self.draining or (now > self.recheck_at and self._pending(now)):
            return None
        if self.writes:  # this process's own writes, just answered
            self.settle()
        entry = self.entries.get(key)
        if entry is None or (entry[2] and now >= entry[2]):
            return None
        return entry

    def _pending(self, now: float) -> bool:
        """Whether invalidations wait unread on the tracking connection. A reader that
        finds some takes them itself (another thread reading them, it waits a millisecond
        at most, then goes to Redis): the tracking thread, which may wait for the GIL
        behind busy callers, is never what stands between an invalidation and the reads
        after it. Looked at (one poll) at most every ``_RECHECK`` seconds: a value is served
        at most that long after its invalidation reached this host, however busy the
        process."""
        sock = self.sock
        # Another thread reading it, or looking at it: wait a moment (the tracking thread may
        # hold it longer, waiting for the rest of a reply: then go to Redis).
        if sock is None or not self.taking.acquire(timeout=_RECHECK * 10):
            return True
        try:
            if self.more() and not self._only_heartbeat(sock):
                self._take(sock, block=False)
            if self.buffer:  # a frame not whole yet
                return True
        except Exception:  # closed: the tracking thread sees it too
            return True
        finally:
            self.taking.release()
        self.recheck_at = now + _RECHECK
        return False

    # Seen by the policy (the _Feature hooks) ---------------------------------

    def sending(self, trip: _Trip) -> None:
        """A read the store would keep asks each key's PTTL too, in the same round trip."""
        commands = trip.commands
        reads = len(commands) == 1 and commands[0][0] in ("GET", "MGET")
        register = self.register
        if reads and time.monotonic() < self.valid_until and register is not None:
            keys = list(commands[0][1:])
            # The connection that reads asks for its keys' invalidations first (NOLOOP: not of
            # its own writes, which this process drops itself; raw clients are on other
            # pools), and says which it is. OPTIN: only this read's keys are tracked (CLIENT
            # CACHING YES), not every key its other commands read (a script's, as incr's: the
            # server would track and untrack the key at each call).
            pttls = (("PTTL", k) for k in keys)
            trip.wire = [*register, commands[0], *pttls]
            trip.ticket = (keys, self.start_read(keys), len(register))

    trip_names = frozenset({"GET", "MGET"})  # the reads it may keep; the rest: passed()

    def passed(self, commands: list[tuple[Any, ...]]) -> None:
        self.written(commands)

    def replied(self, trip: _Trip, replies: list[Any]) -> list[Any]:
        """A read is kept if nothing changed meanwhile; a write drops what it may change."""
        if trip.ticket is None:
            self.written(trip.commands)
            return replies
        keys, ticket, head = trip.ticket
        if not head:  # BCAST: nothing to register
            self.finish_read(ticket, keys, replies)
            return replies[:1]
        registered, connection, caching = replies[0], replies[1], replies[2]
        refused = isinstance(registered, redis.ResponseError) or isinstance(caching, Exception)
        if type(connection) is int and not refused:
            self.registered.add(connection)
            self.finish_read(ticket, keys, replies[3:])
        else:  # not registered: its keys' changes would not be seen
            self.finish_read(ticket, keys, None)
        return replies[3:4]

    def failed(self, trip: _Trip, error: BaseException) -> None:
        if trip.ticket is None:
            self.written(trip.commands)
        else:
            self.finish_read(trip.ticket[1], trip.ticket[0], None)

    def start_read(self, keys: list[Any]) -> tuple[int, float, int]:
        if self.writes:
            self.settle()
        with self.lock:
            for key in keys:
                mark = self.reading.get(key)
                if mark is None:
                    self.reading[key] = [1, 0]
                else:
                    mark[0] += 1
            return self.epoch, time.monotonic(), self.changes

    def finish_read(
        self, ticket: tuple[int, float, int], keys: list[Any], replies: list[Any] | None
    ) -> None:
        """After the read of ``keys``: keep what it found, unless anything changed."""
        epoch, started, changes = ticket
        if self.writes:
            self.settle()
        values: list[Any] = [None] * len(keys)
        pttls: list[Any] = values
        if replies is not None:
            values = replies[0] if isinstance(replies[0], list) else [replies[0]]
            pttls = replies[1:]
        with self.lock:
            fresh = epoch == self.epoch and time.monotonic() < self.valid_until
            for key, value, pttl in zip(keys, values, pttls, strict=True):
                mark = self.reading.get(key) or [1, changes + 1]  # none: a fork came between
                mark[0] -= 1
                changed = mark[1] > changes
                if not mark[0]:
                    self.reading.pop(key, None)
                if not fresh or changed or type(pttl) is not int:
                    continue
                if self.prefix is not None and not key.startswith(self.prefix):
                    continue
                # PTTL: -1 no expiry, -2 no key, 0 under a millisecond left (never kept).
                if type(value) is bytes and (pttl > 0 or pttl == -1):
                    self._put(key, value, started + pttl / 1000 if pttl > 0 else 0.0)
                elif value is None and pttl == -2 and not self.broadcast:
                    # Absent: its creation invalidates it (not on a cluster node: the key may
                    # be made on the node its slot moves to, which this store does not hear).
                    self._keep(key, (_ABSENT, False, 0.0, sys.getsizeof(key) + _ENTRY_SIZE))

    def _put(self, key: str, data: bytes, expires: float) -> None:
        if data[:3] == _TAGGED or (data[:3] == _SIGNED and data[35:38] == _TAGGED):
            return  # tagged: its tags are checked at each read
            return
        try:
            value = self.codec.at(key).loads(data)
        except Exception:  # not ours to read: the caller's own read reports it
            return
        if value is _MISSING:  # not signed (OPTIONS sign_values): never kept
            return
        # Immutable values are kept decoded, others as the stored bytes: counted as the
        # memory they take (a str of emoji takes 4 bytes a character, an int 4 per 9 digits).
        kept = type(value) in _IMMUTABLE
        size = sys.getsizeof(value if kept else data) + sys.getsizeof(key) + _ENTRY_SIZE
        if size > self.max_bytes // 8:
            return
        self._keep(key, (value, False, expires, size) if kept else (data, True, expires, size))

    def _keep(self, key: str, entry: tuple[Any, bool, float, int]) -> None:
        size = entry[3]
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old[3]
        self.entries[key] = entry
        self.bytes += size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1][3]

    def written(self, commands: list[tuple[Any, ...]]) -> None:
        """Drop what ``commands`` (sent by this process, and answered) may have changed:
        their keys are noted here, and dropped before anything is served or kept (``settle``).
        Noted as the key itself for a write of one key (not the command: kept, a container
        would be the garbage collector's to look at), a list of keys, or None for all."""
        writes = self.writes
        for command in commands:
            at = _KEY_AT.get(command[0])
            if at and (at > 0 or command[2] == 1):  # the usual write, or script: one key
                writes.append(command[at] if at > 0 else command[3])
            elif at != 0:
                named = _keys_of(command)
                writes.append(named[0] if named is not None and len(named) == 1 else named)
        if len(writes) > 1000:  # nobody reads: not kept for ever
            self.settle()

    def settle(self) -> None:
        """Drop what the writes noted so far may have changed. A write leaves the queue
        once dropped, under the lock: whoever finds it there waits for it to be done."""
        if not self.writes:
            return
        with self.lock:
            writes = self.writes
            while writes:
                named = writes[0]
                if named is None:
                    self._flush()
                else:
                    self._drop((named,) if type(named) is not list else named)
                writes.popleft()  # once dropped

    def drop(self, keys: Iterable[Any]) -> None:
        with self.lock:
            self._drop(keys)

    def _drop(self, keys: Iterable[Any]) -> None:
        for each in keys:
            key = each.decode(self.encoding, "surrogateescape") if type(each) is bytes else each
            entry = self.entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry[3]
            mark = self.reading.get(key)
            if mark is not None:
                self.changes += 1
                mark[1] = self.changes

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self.epoch += 1
        self.flushes += 1

    def drop_slots(self, slots: set[int]) -> None:
        """Drop the keys of cluster ``slots`` that moved elsewhere; reads in flight keep
        nothing (one of them may have been answered by the node they moved to)."""
        with self.lock:
            encoding = self.encoding
            if slots:
                self._drop([k for k in self.entries if _key_slot(k.encode(encoding)) in slots])
            self.epoch += 1

    def info(self) -> dict[str, Any]:
        connected = self.connected and time.monotonic() < self.valid_until
        info: dict[str, Any] = {"enabled": not self.refused, "connected": connected}
        info["entries"] = len(self.entries)
        names = ("bytes", "hits", "misses", "invalidations", "flushes", "max_entries", "max_bytes")
        info.update((name, getattr(self, name)) for name in names)
        info["heartbeat_interval"] = self.interval
        return info

    # The tracking connection ------------------------------------------------

    def _track_again(self, now: float) -> None:
        """Start the tracking thread if none runs; after a failure, not before a pause."""
        if self.tracker is not None or self.refused or now < self.retry_at:
            return
        with self.lock:
            if self.tracker is None and not self.refused:
                self.tracker = threading.Thread(
                    target=self._track, name="django-redis-ex tracking", daemon=True
                )
                self.tracker.start()

    def _track(self) -> None:
        connection = None
        try:
            connection = self._open()
            if connection is not None:
                self.connected = True
                self._heartbeats(connection)
        except Exception as error:
            if self.connected and not self.stopping:
                logger.warning(
                    "client_cache: the tracking connection was lost (%s); reads go to Redis "
                    "until it is back.",
                    error,
                )
        finally:
            self.valid_until = 0.0
            self.sock = None
            self.flush()
            self.connected = False
            if self.lost is not None:  # a cluster node's: its slots may be another's now
                self.lost()
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.disconnect()
            self.retry_at = time.monotonic() + 2 * self.interval
            self.tracker = None

    def stop(self, timeout: float) -> None:
        """End the tracking thread (the store is empty until a read starts it again)."""
        tracker = self.tracker
        if tracker is None:
            return
        self.stopping = True
        deadline = time.monotonic() + timeout
        try:
            while tracker.is_alive() and time.monotonic() < deadline:
                sock = self.sock  # None while it connects
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # its wait and read end at once
                tracker.join(0.02)
        finally:
            self.stopping = False

    def _only_heartbeat(self, sock: socket.socket) -> bool:
        """Whether the bytes waiting (there are some: under ``taking``) are (part of) the
        heartbeat's replies, no invalidation: a peek, which reads nothing (TLS: no peek)."""
        if isinstance(sock, ssl.SSLSocket):
            return False
        answer = self.answer  # a byte more: an invalidation may follow the answer
        waiting = sock.recv(len(answer) + 1, socket.MSG_PEEK)
        return bool(waiting) and answer.startswith(waiting)

    def _heartbeats(self, connection: Any) -> NoReturn:
        """Every interval, a ping, and a read of the db's marker (it sees ``SWAPDB``, which
        sends no invalidation). Between, the invalidations are read as they gather: the
        socket is waited on with ``poll``, which reads nothing, then read a millisecond
        later, once per millisecond at most, not once per write of this process. Until they
        are read, a reader that looks finds them and reads them itself (``_pending``). They
        are read here, not by redis-py's parser (``_take``)."""
        sock = connection._sock
        wait = _waiter(sock)
        self.buffer.clear()  # a frame begun on a connection lost before
        self.more = _waiter(sock, 0)  # used under ``taking`` only: one thread at a time
        self.sock = sock
        while True:
            marker = self.marker
            self.answer = b"+PONG\r\n"  # (then ROLE's, which varies, on a cluster node)
            if not self.broadcast:
                self.answer += b"$%d\r\n%s\r\n" % (len(marker), marker) if marker else b"_\r\n"
            sent = time.monotonic()
            ids = sorted(self.registered.copy())  # (readers add to it meanwhile)
            listing = connection.pack_commands([("CLIENT", "LIST", "ID", *ids)]) if ids else []
            packed = [b"".join(self.heartbeat + listing)]  # one write: one read at the server
            replies = self._ask(connection, wait, packed, 2 + bool(ids))
            for reply in replies:
                if isinstance(reply, redis.ResponseError):
                    raise reply
            gone = set(ids) - _client_ids(replies[-1]) if ids else set()
            if gone:  # what they read changes unseen now: all of it goes
                self.registered -= gone
                self.flush()
            if not self.broadcast:
                self._check_marker(connection, wait, replies[1])
            elif not (isinstance(replies[1], list) and replies[1][:1] == [b"master"]):
                # A failover made it a replica (it announces the writes it replicates, late
                # by that delay): its slots are another node's, and the map is read again.
                raise redis.ConnectionError("the node is a primary no more (ROLE)")
            self.valid_until = sent + 2 * self.interval
            self.beat_at = sent
            while (left := sent + self.interval - time.monotonic()) > 0:
                if wait(left * 1000):
                    time.sleep(_GATHER)  # let them gather; readers take them meanwhile
                    with self.taking:
                        self._take(sock, block=True)
                    self.settle()  # this process's writes, if nobody reads

    def _check_marker(self, connection: Any, wait: Callable[..., bool], marker: Any) -> None:
        """Flush if the db's marker changed: the db was swapped, flushed or it was deleted."""
        if marker != self.marker:
            self.flush()
        if marker is None:  # (re)written: this store's, unless another store's came first
            written = self._ask(connection, wait, self.marking, 2)[1]
            marker = None if isinstance(written, redis.ResponseError) else written
        self.marker = marker

    def _ask(
        self, connection: Any, wait: Callable[..., bool], packed: list[bytes], count: int
    ) -> list[Any]:
        """Send ``packed`` commands on the tracking connection; their ``count`` replies,
        read here or by a reader that takes what waits first (error replies as objects)."""
        sent = time.monotonic()
        with self.taking:
            self.heard.clear()
            connection.send_packed_command(packed)
        while len(self.heard) < count:
            if time.monotonic() - sent > connection.socket_timeout:
                raise redis.TimeoutError("No reply on the tracking connection within its timeout.")
            if wait(_GATHER * 1000):
                with self.taking:
                    self._take(connection._sock, block=True)
        return self.heard[:count]

    def _take(self, sock: socket.socket, block: bool) -> None:
        """Read what waits on the tracking connection (with ``block``, and the rest of a
        reply begun): invalidations are handled, the heartbeat's replies kept in ``heard``.
        Under ``taking``."""
        self.draining = True
        buffer = self.buffer
        try:
            while True:
                waiting = self.more() or (isinstance(sock, ssl.SSLSocket) and sock.pending())
                if not waiting and (not buffer or not block):  # (another thread took it)
                    return
                data = sock.recv(65536)  # waiting, or the rest of a frame begun
                if not data:  # whoever reads it first: nothing is served from now on
                    self.valid_until = 0.0
                    self.flush()
                    raise redis.ConnectionError("Connection closed by server.")
                buffer += data
                self.heard += self._replies(buffer)
        finally:
            self.draining = False
            self.recheck_at = 0.0

    def _replies(self, buffer: bytearray) -> list[Any]:
        """Take the whole RESP3 frames at the start of ``buffer``; invalidations handled,
        those of one key each (a write's) at once, by one match each."""
        replies: list[Any] = []
        keys: set[bytes] = set()
        at, size = 0, len(buffer)
        one_key = _ONE_KEY.match
        while at < size:
            found = one_key(buffer, at)
            if found is not None:
                end = found.end() + int(found[1])
                if end + 2 > size:
                    break
                keys.add(bytes(buffer[found.end() : end]))
                at = end + 2
                continue
            taken = _resp3(buffer, at)
            if taken is _MISSING:
                break
            frame, at = taken
            if type(frame) is not _Push:
                replies.append(frame)  # a reply (an error reply as its object)
            elif frame[:1] == [b"invalidate"]:  # not another kind of push (maintenance)
                self._invalidated(frame)
        del buffer[:at]
        if keys:
            self._invalidated([b"invalidate", keys])
        return replies

    def _settle(self, connection: Any) -> None:
        """Let redis-py's parser read whatever reached it: from now on this thread reads
        the socket itself, and nothing may wait in the parser's buffer."""
        while connection.can_read(timeout=0):
            connection.read_response(push_request=True)

    def _open(self) -> Any:
        """The tracking connection; None if the server refuses tracking (logged, store off)."""
        try:
            return self._tracking_connection()
        except redis.ResponseError as error:
            if str(error).startswith(_BUSY_REPLIES):  # the server is busy, not refusing
                raise redis.ConnectionError(str(error)) from error
            self.refused = True
            logger.warning(
                "OPTIONS 'client_cache' is off for %s: the server refused CLIENT TRACKING "
                "(%s). The cache works on without its local store.",
                ", ".join(_redact(url) for url in self.topology.servers),
                error,
            )
            return None

    def _tracking_connection(self) -> Any:
        """A RESP3 connection to the server that takes writes, tracking the prefix."""
        pool = self.topology.sync_client(0).connection_pool
        options = {**pool.connection_kwargs, "protocol": 3}
        # redis-py's Python parser reads the handshake: what it buffered stays visible to
        # can_read (``_settle``), then this thread reads the socket itself.
        options["parser_class"] = redis._parsers._RESP3Parser
        options["socket_timeout"] = max(4 * self.interval, 1.0)
        connection = pool.connection_class(**options)
        connection.connect()
        connection._parser.set_invalidation_push_handler(self._invalidated)
        # Tracking is asked for on the connections that read (``sending``), redirected
        # here; one round trip tries it here (an ACL may refuse it: the store is off).
        # A cluster node's store tracks the prefix here (BCAST), whoever reads.
        prefix = ("PREFIX", self.prefix) if self.prefix is not None else ()
        trying = [("CLIENT", "TRACKING", "ON"), ("CLIENT", "TRACKING", "OFF")]
        if self.broadcast:
            trying = [("CLIENT", "TRACKING", "ON", "BCAST", *prefix)]
        for command in trying:
            connection.send_command(*command)
            connection.read_response()
        connection.send_command("CLIENT", "SETNAME", _TRACKER_NAME)
        connection.read_response()
        connection.send_command("CLIENT", "ID")
        tracker = connection.read_response()
        registration = ("CLIENT", "TRACKING", "ON", "REDIRECT", tracker, "NOLOOP", "OPTIN")
        self.register = [] if self.broadcast else [registration, _CLIENT_ID, _CACHING]
        self.registered.clear()
        self.flush()  # nothing read before tracking began is trusted
        self.marker = None  # read (and written, if missing) by the first heartbeat
        beats = [("PING",), ("ROLE",) if self.broadcast else ("GET", self.marker_key)]
        self.heartbeat = connection.pack_commands(beats)
        token = os.urandom(16).hex()
        self.marking = connection.pack_commands(
            [("SET", self.marker_key, token, "NX"), ("GET", self.marker_key)]
        )
        self._settle(connection)
        return connection

    def _invalidated(self, message: list[Any]) -> object:
        """An invalidation push: ``["invalidate", keys]``, keys None for a flush."""
        keys = message[1] if len(message) > 1 else None
        if keys is None:  # FLUSHDB, FLUSHALL
            self.flush()
        else:
            self.invalidations += len(keys)
            self.drop(keys)
        return _PUSHED


_PUSHED = object()  # what the tracking connection's read returns for an invalidation
_TRACKER_NAME = "django-redis-ex-tracking"  # CLIENT SETNAME of the tracking connections


_ONE_KEY = re.compile(rb">2\r\n\$10\r\ninvalidate\r\n\*1\r\n\$(\d+)\r\n")  # then the key


class _Push(list):  # type: ignore[type-arg]
    """A RESP3 push frame's items."""


def _resp3(buffer: bytes | bytearray, start: int) -> Any:
    """The RESP3 frame at ``start`` and where it ends, or ``_MISSING`` if it is not whole
    yet: the kinds a tracking connection receives (pushes, and the heartbeat's replies)."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return _MISSING
    kind, line, at = buffer[start], buffer[start + 1 : end], end + 2
    if kind in (36, 61):  # $: a bulk string; =: a verbatim one (CLIENT LIST), after "txt:"
        size = int(line)
        if size < 0:
            return None, at
        if len(buffer) < at + size + 2:
            return _MISSING
        return bytes(buffer[at + 4 * (kind == 61) : at + size]), at + size + 2
    if kind in (42, 62, 126):  # *, > and ~: an array, a push, a set
        items: list[Any] = _Push() if kind == 62 else []
        for _ in range(int(line)):
            taken = _resp3(buffer, at)
            if taken is _MISSING:
                return _MISSING
            items.append(taken[0])
            at = taken[1]
        return items, at
    one_line = _RESP3_LINES.get(kind)
    if one_line is None:
        raise redis.exceptions.InvalidResponse(
            f"The tracking connection received {bytes(buffer[start : start + 40])!r}."
        )
    return one_line(line), at


# The RESP3 frames of one line: +, a simple string; :, an integer; _, null; -, an error.
_RESP3_LINES: dict[int, Callable[[bytes | bytearray], Any]] = {
    43: bytes,
    58: int,
    95: lambda line: None,
    45: lambda line: redis.ResponseError(line.decode("utf-8", "replace")),
}


# A key the store writes once in its db (SET NX, under the key prefix, never expiring) and
# reads at every heartbeat: if it changed, the db's contents were swapped (SWAPDB sends no
# invalidation) or flushed, and the store flushes too. Not a key Django's key function
# makes: its version part is not a number.
_MARKER = "django-redis-ex:client-cache"
_CLIENT_ID = ("CLIENT", "ID")
_CACHING = ("CLIENT", "CACHING", "YES")  # OPTIN: the next command's keys are tracked


def _client_ids(listing: bytes) -> set[int]:
    """The client ids of a CLIENT LIST reply."""
    return {int(line[3:].split(b" ", 1)[0]) for line in listing.splitlines() if line[:3] == b"id="}


def _waiter(sock: socket.socket, timeout: float | None = None) -> Callable[..., bool]:
    """A function that waits (up to its argument in ms, or ``timeout``) until ``sock`` is
    readable, reading nothing, and says whether it is: ``poll``, which, unlike ``select``,
    takes a descriptor past 1023 (a process with many open files). One per thread: a poll
    object must not be used by two threads at once (it raises RuntimeError)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        if timeout is None:
            return lambda ms: bool(poller.poll(ms))
        return lambda: bool(poller.poll(timeout))
    if timeout is None:  # Windows
        return lambda ms: bool(select.select([sock], [], [], ms / 1000)[0])
    return lambda: bool(select.select([sock], [], [], timeout)[0])


_BUSY_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN")  # error replies that pass
_stores: dict[Hashable, _Store] = {}
_cluster_stores: dict[Hashable, _ClusterStore] = {}
_stores_lock = threading.Lock()


class _ClusterStore(_Feature):
    """The client-side cache on a cluster: a store per primary (``_Store``, BCAST on that
    node), each key served by the store of its slot's primary as the slot map says. A slot
    that moves (``MOVED``, ``ASK``, a new map) loses its entries in the store it left,
    which keeps nothing of the reads in flight; a node whose tracking connection is lost
    flushes its store (its slots). Reads and writes spanning nodes go to each store."""

    trip_names = frozenset({"GET", "MGET"})

    def __init__(self, cluster: _Cluster, prefix: str | None, settings: dict[str, Any]) -> None:
        self.cluster, self.prefix, self.settings = cluster, prefix, settings
        self.stores: dict[str, _Store] = {}
        cluster.slots.listeners.append(self.moved)

    def store(self, node: str) -> _Store:
        store = self.stores.get(node)
        if store is None:
            made = cast(_Store, _store_for(self.cluster.node(node), self.prefix, self.settings))
            store = self.stores.setdefault(node, made)
            store.lost = self._lost
        return store

    def _of(self, key: str) -> _Store | None:
        """The store of ``key``'s primary; None until the slot map is read."""
        owner = self.cluster.slots.owner
        return self.store(owner[self.cluster.slot(key)]) if owner else None

    def lookup(self, key: str) -> Any:
        store = self._of(key)
        return _MISSING if store is None else store.lookup(key)

    def lookup_many(self, keys: list[str]) -> list[Any] | None:
        values = [self.lookup(key) for key in keys]
        return None if any(value is _MISSING for value in values) else values

    def holds(self, key: str) -> bool | None:
        store = self._of(key)
        return None if store is None else store.holds(key)

    def sending(self, trip: _Trip) -> None:
        """A read (its pieces on their nodes) asks each key's PTTL too, in the same trip;
        each store whose node tracks keeps what the read found of its keys."""
        commands = trip.commands
        if (
            len(commands) != 1
            or commands[0][0] not in ("GET", "MGET")
            or not self.cluster.slots.owner
        ):
            return
        keys = list(commands[0][1:])
        groups: dict[_Store, list[int]] = {}
        slots = self.cluster.slots
        moves = slots.moves  # a move after this: the keys' stores may not be theirs
        for at, key in enumerate(keys):
            store = self._of(key)
            if store is not None and store.register is not None:
                groups.setdefault(store, []).append(at)
        if groups:
            now = time.monotonic()
            tickets = [
                (store, ats, store.start_read([keys[at] for at in ats]))
                for store, ats in groups.items()
                if now < store.valid_until
            ]
            if slots.moves != moves:  # read, but kept by none
                for store, ats, ticket in tickets:
                    store.finish_read(ticket, [keys[at] for at in ats], None)
                tickets = []
            if tickets:
                trip.wire = [commands[0], *(("PTTL", key) for key in keys)]
                trip.ticket = (keys, tickets)

    def passed(self, commands: list[tuple[Any, ...]]) -> None:
        self.written(commands)

    def replied(self, trip: _Trip, replies: list[Any]) -> list[Any]:
        if trip.ticket is None:
            self.written(trip.commands)
            return replies
        keys, tickets = trip.ticket
        found = replies[0] if isinstance(replies[0], list) else [replies[0]]
        for store, ats, ticket in tickets:
            mine = [keys[at] for at in ats]
            if isinstance(replies[0], Exception):
                store.finish_read(ticket, mine, None)
            else:
                values = [found[at] for at in ats]
                store.finish_read(ticket, mine, [values, *(replies[1 + at] for at in ats)])
        return replies[:1]

    def failed(self, trip: _Trip, error: BaseException) -> None:
        if trip.ticket is None:
            self.written(trip.commands)
            return
        keys, tickets = trip.ticket
        for store, ats, ticket in tickets:
            store.finish_read(ticket, [keys[at] for at in ats], None)

    def written(self, commands: list[tuple[Any, ...]]) -> None:
        """Each write goes to the store of its key's node; one on keys of several, or on
        any key, to every store."""
        for command in commands:
            keys = _keys_written(command)
            if keys == []:
                continue
            if keys is not None and len(keys) == 1 and (store := self._of(keys[0])) is not None:
                store.written([command])
            else:
                for store in list(self.stores.values()):
                    store.written([command])

    def _lost(self) -> None:
        """A node's tracking connection ended (the node failed, or is a replica now)."""
        self.cluster.slots.stale = True

    def moved(self, moves: dict[str, set[int]], entries: bool) -> None:
        """Slots left these nodes (``entries``: their entries go; else only reads in flight)."""
        for node, slots in moves.items():
            store = self.stores.get(node)
            if store is not None:
                store.drop_slots(slots if entries else set())

    def info(self) -> dict[str, Any]:
        nodes = {node: store.info() for node, store in sorted(self.stores.items())}
        info: dict[str, Any] = {
            "enabled": all(each["enabled"] for each in nodes.values()),
            "connected": bool(nodes) and all(each["connected"] for each in nodes.values()),
        }
        for name in ("entries", "bytes", "hits", "misses", "invalidations", "flushes"):
            info[name] = sum(each[name] for each in nodes.values())
        for name in ("max_entries", "max_bytes", "heartbeat_interval"):
            info[name] = self.settings[name]
        info["nodes"] = nodes
        return info


_AnyStore = Union[_Store, _ClusterStore]  # noqa: UP007


def _store_for(
    topology: _Topology, prefix: str | None, node_settings: dict[str, Any] | None = None
) -> _Store | _ClusterStore | None:
    """The configuration's store, if OPTIONS ask for one: one per server, key prefix and
    codec in this process, whichever class or alias uses it; on a cluster, one per node
    (``node_settings``: a node's, BCAST) behind one ``_ClusterStore``."""
    settings = node_settings or topology.config.client_cache
    if settings is None:
        return None
    key = (topology.pool_key("sync", 0), prefix, topology.config.codec_key, _freeze(settings))
    found: _Store | _ClusterStore | None = (
        _cluster_stores if isinstance(topology, _Cluster) else _stores
    ).get(key)
    if found is None:
        with _stores_lock:
            if isinstance(topology, _Cluster):
                found = _cluster_stores.get(key)
                if found is None:
                    found = _cluster_stores[key] = _ClusterStore(topology, prefix, settings)
            else:
                found = _stores.get(key)
                if found is None:
                    broadcast = node_settings is not None
                    found = _stores[key] = _Store(topology, prefix, settings, broadcast)
    return found


def close_client_caches(timeout: float = 5.0) -> None:
    """Close the tracking connections of this process's client-side caches (OPTIONS
    ``client_cache``), each within ``timeout`` seconds, for a clean exit before Redis stops
    (a tracking connection lost otherwise logs a warning). A cache used afterwards tracks
    again: its reads go to Redis until then."""
    for store in list(_stores.values()):
        store.stop(timeout)


def _stores_after_fork_in_child() -> None:
    global _stores_lock
    _stores_lock = threading.Lock()
    for store in _stores.values():
        store._fresh_start()  # the parent's thread is not here; its socket is left alone


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_stores_after_fork_in_child)


# ---------------------------------------------------------------------------
# Optional feature: the circuit breaker (OPTIONS "circuit_breaker", with ignore_exceptions)
# ---------------------------------------------------------------------------


class _CircuitOpen(redis.ConnectionError):
    """A call not sent: the circuit breaker is open (Redis failed the calls before it)."""


class _Breaker:
    """One server's circuit (per configuration and process, both paths): after ``failures``
    outages in a row, calls skip it with their ignored-error results; after a cool-down (0.25
    s, doubled after each failed probe up to ``cool_down``) a probe closes or reopens it."""

    def __init__(self, settings: dict[str, Any], where: str) -> None:
        self.threshold, self.longest = settings["failures"], settings["cool_down"]
        self.shortest = min(_FIRST_COOL_DOWN, self.longest)
        self.cool_down = self.shortest
        self.where = where
        self.lock = threading.Lock()
        self.failures = 0  # outages in a row
        self.open_until = 0.0  # self.clock() until which calls skip it; 0.0: closed
        self.probing = False  # a probe is out
        self.opened = 0  # times the circuit opened (from closed)
        self.clock: Callable[[], float] = time.monotonic  # a test's scripted clock

    def admit(self) -> bool:
        """Whether a round trip goes out while the circuit is open: the probe, once cooled."""
        with self.lock:
            if not self.open_until:
                return True
            if self.probing or self.clock() < self.open_until:
                return False
            self.probing = True
            return True

    def succeeded(self) -> None:
        """The server answered."""
        with self.lock:
            self.failures = 0
            self.cool_down = self.shortest
            if self.open_until:
                self.open_until, self.probing = 0.0, False
                logger.warning("Redis at %s answers again: circuit breaker closed.", self.where)

    def failed(self) -> None:
        """The server was unavailable."""
        with self.lock:
            self.failures += 1
            if self.probing:  # still down: open for a longer cool-down
                self.probing = False
                self.cool_down = min(self.cool_down * 2, self.longest)
                self.open_until = self.clock() + self.cool_down
                logger.debug("Redis at %s still unavailable: circuit breaker open.", self.where)
            elif not self.open_until and self.failures >= self.threshold:
                self.open_until = self.clock() + self.cool_down
                self.opened += 1
                logger.warning(
                    "Redis at %s failed %d calls in a row: circuit breaker open; calls skip "
                    "it for %s s (longer while it stays down, up to %s s), then one tries it.",
                    self.where,
                    self.failures,
                    self.cool_down,
                    self.longest,
                )

    def released(self) -> None:
        """The probe ended without an answer (cancelled, the caller's error): next call probes."""
        with self.lock:
            self.probing = False

    def state(self) -> dict[str, Any]:
        state = "closed" if not self.open_until else "half-open" if self.probing else "open"
        return {"state": state, "failures_in_a_row": self.failures, "opened": self.opened}


_FIRST_COOL_DOWN = 0.25


def _outage(error: BaseException) -> bool:
    """Whether ``error`` is an outage: not our pool's wait, wrong credentials or the breaker."""
    return (
        isinstance(error, _UNAVAILABLE)
        and not isinstance(error, (_PoolExhausted, _CircuitOpen))
        and not _wrong_credentials(error)
    )


class _Breakers(_Feature):
    """A circuit per server: a read bound for a replica whose circuit is open goes to the
    first server; anything else bound for an open circuit is refused (``_CircuitOpen``)."""

    def __init__(self, circuits: list[_Breaker]) -> None:
        self.circuits = circuits

    def sending(self, trip: _Trip) -> None:
        circuit = self.circuits[trip.index]
        if not circuit.open_until:
            return
        if circuit.admit():
            trip.probe = circuit
        elif trip.index:  # a replica: the first server answers the read
            trip.index = 0
            self.sending(trip)
        else:
            raise _CircuitOpen(f"circuit breaker open for Redis at {circuit.where}")

    def replied(self, trip: _Trip, replies: list[Any]) -> list[Any]:
        circuit = self.circuits[trip.index]
        if circuit.failures or circuit.open_until:
            circuit.succeeded()
        return replies

    def failed(self, trip: _Trip, error: BaseException) -> None:
        if _outage(error) and not trip.again:  # a dead idle connection: one more try first
            self.circuits[trip.index].failed()
        elif trip.probe is not None:
            trip.probe.released()

    def report(self) -> dict[str, Any]:
        """The first server's circuit; with replicas, theirs under ``"replicas"``."""
        state = self.circuits[0].state()
        if len(self.circuits) > 1:
            state["replicas"] = [circuit.state() for circuit in self.circuits[1:]]
        return state


_breakers: dict[Hashable, _Breaker] = {}


def _breakers_for(topology: _Topology) -> _Breakers | None:
    """The configuration's circuits, one per server, if it has a circuit breaker."""
    settings = topology.config.circuit_breaker
    if settings is None:
        return None
    circuits = []
    for index in range(topology.readers + 1):
        key = topology.pool_key("sync", index)
        circuit = _breakers.get(key)
        if circuit is None:
            where = _redact(topology.servers[min(index, len(topology.servers) - 1)])
            circuit = _breakers.setdefault(key, _Breaker(settings, where))
        circuits.append(circuit)
    return _Breakers(circuits)


# ---------------------------------------------------------------------------
# Optional feature: counts per method (cache.stats())
# ---------------------------------------------------------------------------


class _Stats(_Feature):
    """``cache.stats()``: calls, hits, misses, errors and ignored errors per method (``get``
    counts ``aget``), per configuration in this process. ``+=`` on a list item, which no
    thread switch splits under the GIL: no lock (a test counts from 8 threads)."""

    trips = False

    def __init__(self) -> None:
        # The reads that count hits take their row with a plain subscript: made here.
        self.rows: dict[str, list[int]] = {m: [0, 0, 0, 0, 0] for m in _TALLIED}

    def row(self, method: str) -> list[int]:
        row = self.rows.get(method)
        if row is None:  # setdefault: one row for threads that race to make it
            row = self.rows.setdefault(method, [0, 0, 0, 0, 0])
        return row

    def end(self, plan: Plan[Any], error: BaseException | None, ignored: bool) -> None:
        row = self.rows.get(plan.method) or self.row(plan.method)
        row[_CALLS] += 1
        if error is not None:
            if ignored:
                row[_IGNORED] += 1
            elif isinstance(error, redis.RedisError):
                row[_ERRORS] += 1

    def served(self, method: str, hits: int, misses: int) -> None:
        """A call answered by the client-side store: ``hits`` keys found, ``misses`` keys
        known to be absent."""
        row = self.row(method)
        row[_CALLS] += 1
        row[_HITS] += hits
        row[_MISSES] += misses

    def report(self) -> dict[str, dict[str, int]]:
        return {
            method: dict(zip(_STAT_NAMES, row, strict=True))
            for method, row in sorted(list(self.rows.items()))
            if any(row)  # a method never called has no counts to show
        }


_TALLIED = ("get", "get_many", "get_or_set", "has_key")
_stats: dict[Hashable, _Stats] = {}


def _stats_for(topology: _Topology, key_prefix: str, version: int) -> _Stats:
    """The counts of the cache of this configuration: of an alias, in practice."""
    key = (tuple(topology.servers), topology.config.options, key_prefix, version)
    found = _stats.get(key)
    return _stats.setdefault(key, _Stats()) if found is None else found


# ---------------------------------------------------------------------------
# cache.stats()["pools"]: what this configuration's pools, lines and tracking hold now
# ---------------------------------------------------------------------------


_redacted = functools.lru_cache(maxsize=256)(_redact)  # the report's server URLs


def _where_pooled(source: _Topology, index: int) -> str:
    """The redacted URL of the server a pool at ``index`` reaches (Sentinel's replica pool:
    the service's)."""
    return _redacted(source.servers[min(index, len(source.servers) - 1)])


def _seconds_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _pool_report(pool: Any, server: str, role: str, raw: bool) -> dict[str, Any]:
    """A pool's state now, read without its lock (a length, or a copy of its free list: one
    step each under the GIL): ``in_use`` checked out (for a call, a multiplexed line's
    calls, a raw client's command), ``idle`` free and connected, ``max``, ``opened``
    (connects since the pool was made: a reconnect counts), ``waiting`` (callers queued
    now), ``waits`` (callers that waited since the pool was made) and ``longest_wait``
    (seconds: the longest a caller waited, or waits now). None
    where a pool class of redis-py's own (OPTIONS ``pool_class``) does not count it."""
    in_use = getattr(pool, "_in_use_connections", None)
    free = getattr(pool, "_available_connections", None)
    queue: Any = getattr(pool, "_queue", None)
    longest: float | None = getattr(pool, "_longest_wait", None)
    if queue:
        with contextlib.suppress(IndexError, AttributeError):  # served meanwhile
            longest = max(longest or 0.0, time.monotonic() - queue[0].since)
    report = {
        "server": server,
        "role": role,
        "raw": raw,
        "in_use": None if in_use is None else len(in_use),
        "idle": None if free is None else sum(1 for c in list(free) if c.is_connected),
        "max": pool.max_connections,
        "opened": getattr(pool, "_opened", None),
        "waiting": None if queue is None else len(queue),
        "waits": getattr(pool, "_waits", None),
        "longest_wait": _seconds_or_none(longest),
    }
    if isinstance(pool, _AsyncWaitForConnection):
        report["resumed"] = pool._resumes  # parked sockets taken up: no new connection
    return report


def _cluster_node_report(node: Any, raw: bool) -> dict[str, Any]:
    """A node of redis-py's asyncio RedisCluster: its own connection list, no queue."""
    free = list(node._free)
    return {
        "server": node.name,
        "role": node.server_type or "primary",
        "raw": raw,
        "in_use": len(node._connections) - len(free),
        "idle": sum(1 for c in free if c.is_connected),
        "max": node.max_connections,
        "opened": None,
        "waiting": None,
        "waits": None,
        "longest_wait": None,
    }


class _Pools:
    """Where one configuration's pools are: (topology, index, role, raw) for each, the
    registry keys found from them; nothing is made or connected here."""

    def __init__(self, topology: _Topology) -> None:
        self.servers: list[tuple[_Topology, int, str, bool]] = []  # pools of our own
        self.clusters: list[tuple[_Cluster, bool]] = []  # redis-py RedisCluster clients
        sources = [(topology, False)]
        if topology.config.client_cache is not None:  # raw clients: pools of their own
            sources.append((topology.untracked, True))
        for source, raw in sources:
            if isinstance(source, _Cluster):
                self.clusters.append((source, raw or source.config.direct))
                if source.config.direct and not raw:  # the shells' pools, node by node
                    for address in list(source.slots.addresses):
                        self.servers.append((source.node(address), 0, "primary", False))
            else:
                for index in range(source.readers + 1):
                    role = "replica" if index else "primary"
                    self.servers.append((source, index, role, raw))

    def sync(self) -> list[dict[str, Any]]:
        found = []
        for source, index, role, raw in self.servers:
            client = _registry._sync.get(source.pool_key("sync", index))
            if client is not None:
                where = _where_pooled(source, index)
                found.append(_pool_report(client.connection_pool, where, role, raw))
        for cluster, raw in self.clusters:
            client = _registry._sync.get(cluster.pool_key("sync", 0))
            nodes = client.nodes_manager.nodes_cache if client is not None else {}  # type: ignore[attr-defined]
            for node in list(nodes.values()):
                connection = node.redis_connection
                if connection is not None:
                    role = node.server_type or "primary"
                    found.append(_pool_report(connection.connection_pool, node.name, role, raw))
        return found

    def loop(self, loop: asyncio.AbstractEventLoop, entry: _LoopClients) -> tuple[Any, Any]:
        """A live loop's pools, and its multiplexed lines."""
        pools, lines = [], []
        for source, index, role, raw in self.servers:
            client = entry.clients.get(source.async_keys[index])
            if client is None:
                continue
            where = _where_pooled(source, index)
            pools.append(_pool_report(client.connection_pool, where, role, raw))
            line: _Line | None = getattr(client, "line", None)
            if line is not None:
                busy = {"in_flight": len(line.sent), "queued": len(line.queue)}
                lines.append({"server": where, "role": role, **busy})
        for cluster, raw in self.clusters:
            client = entry.clients.get(cluster.pool_key("async", 0))
            nodes = client.nodes_manager.nodes_cache if client is not None else {}  # type: ignore[attr-defined]
            pools += [_cluster_node_report(node, raw) for node in list(nodes.values())]
        return pools, lines

    def parked(self) -> list[dict[str, Any]]:
        """Sockets parked at a loop's shutdown for the next loop's pool (``_ParkingLot``):
        open at the server, in no pool; per server, not per loop."""
        found = []
        for source, index, _role, _raw in self.servers:
            if isinstance(source, _Servers):
                with _parking._lock:
                    count = len(_parking._sockets.get(source.async_keys[index], ()))
                if count:
                    found.append({"server": _where_pooled(source, index), "connections": count})
        return found


def _live_loops() -> list[tuple[asyncio.AbstractEventLoop, _LoopClients]]:
    """The loops with clients in this process (and generation), closed ones left out."""
    with _registry._lock:  # threads add loops under it: a WeakSet cannot be copied meanwhile
        loops = list(_registry._loops)
    live = []
    for loop in loops:
        entry = _registry._clients_of(loop)
        if entry is not None and not loop.is_closed():
            live.append((loop, entry))
    return live


def _tracking_state(store: _Store) -> dict[str, Any]:
    """Up: connected, its last heartbeat answered within two intervals (as ``info()``)."""
    now, beat = time.monotonic(), store.beat_at
    return {
        "connected": store.connected and now < store.valid_until,
        "heartbeat_age": None if beat is None else round(now - beat, 6),
    }


def _tracking_report(store: _AnyStore | None) -> dict[str, Any] | None:
    if store is None:
        return None
    if isinstance(store, _Store):
        return _tracking_state(store)
    nodes = {node: _tracking_state(each) for node, each in sorted(list(store.stores.items()))}
    ages = [each["heartbeat_age"] for each in nodes.values()]
    return {
        "connected": bool(nodes) and all(each["connected"] for each in nodes.values()),
        "heartbeat_age": None if not ages or None in ages else max(ages),
        "nodes": nodes,
    }


def _pools_report(topology: _Topology, store: _AnyStore | None) -> dict[str, Any]:
    """``cache.stats()["pools"]``: reads what the pools keep, no I/O, no lock of theirs."""
    pools = _Pools(topology)
    running = asyncio._get_running_loop()
    loops, lines = [], []
    for loop, entry in _live_loops():
        loop_pools, loop_lines = pools.loop(loop, entry)
        if not loop_pools:
            continue
        name = f"{id(loop):#x}"
        loops.append({"loop": name, "current": loop is running, "pools": loop_pools})
        lines += [{"loop": name, **line} for line in loop_lines]
    return {
        "sync": pools.sync(),
        "async": loops,
        "parked": pools.parked(),
        "lines": lines,
        "tracking": _tracking_report(store),
    }


# ---------------------------------------------------------------------------
# Optional feature: OpenTelemetry spans, in its database client conventions
# ---------------------------------------------------------------------------

_TRACER = None if _otel is None else _otel.get_tracer("django_redis_ex", __version__)


def _tracing() -> bool:
    """Whether spans would be recorded: a tracer provider (an SDK) is set (else a span costs
    1 us a call for nothing). Asking the API costs 0.8 us; the global it reads, nothing."""
    if _otel is None:
        return False
    if _OTEL_GLOBAL:
        return _otel._TRACER_PROVIDER is not None
    return not isinstance(_otel.get_tracer_provider(), _otel.ProxyTracerProvider)


_OTEL_GLOBAL = _otel is not None and hasattr(_otel, "_TRACER_PROVIDER")


class _Tracing(_Feature):
    """A CLIENT span per call that goes to Redis (a page of an iteration is a call), current
    while it runs; installed while a tracer provider is set. Never a value nor a password."""

    def __init__(self, topology: _Topology, prefix: str) -> None:
        self.topology, self.prefix = topology, prefix

    def sending(self, trip: _Trip) -> None:
        plan = trip.plan
        if getattr(plan, "trace", None) is not None or not _tracing():
            return
        span = _span(self.topology, self.prefix + plan.method, trip.commands)
        if span is None:
            return
        plan.trace = (span, _otel_context.attach(_otel.set_span_in_context(span)))

    def end(self, plan: Plan[Any], error: BaseException | None, ignored: bool) -> None:
        traced = getattr(plan, "trace", None)
        if traced is not None:
            _span_ended(traced, None if ignored else error)


def _span(topology: _Topology, method: str, commands: list[tuple[Any, ...]]) -> Any:
    """A started span named after the call's first ``commands``, None if sampled out: the
    command, the number of keys, the method, where the server is."""
    names = {each[0] for each in commands}
    operation = commands[0][0] if len(commands) == 1 else "PIPELINE"
    if len(commands) > 1 and len(names) == 1:
        operation += " " + commands[0][0]
    url = urlsplit(topology.servers[0])
    attributes: dict[str, Any] = {
        "db.system.name": "redis",
        "db.operation.name": operation,
        "db.namespace": str(topology.config.sync_options.get("db") or url.path[1:] or 0),
        "server.address": url.hostname or url.path,
        "server.port": url.port or 6379,
        "django_redis_ex.method": method,
        "django_redis_ex.keys": sum(len(_keys_of(each) or ()) for each in commands),
    }
    if len(commands) > 1:
        attributes["db.operation.batch.size"] = len(commands)
    span = cast(Any, _TRACER).start_span(
        operation, kind=_otel.SpanKind.CLIENT, attributes=attributes
    )
    return span if span.is_recording() else None


def _span_ended(traced: tuple[Any, Any], error: BaseException | None) -> None:
    """End a span, no longer current, with ``error.type`` and an error status for ``error``."""
    span, token = traced
    if isinstance(error, Exception):
        code = getattr(error, "status_code", None) or type(error).__qualname__
        span.set_attribute("error.type", code)
        span.set_status(_otel.Status(_otel.StatusCode.ERROR, str(error)))
    span.end()
    with contextlib.suppress(ValueError):  # detached in another context: a dropped call
        _otel_context.detach(token)


# ---------------------------------------------------------------------------
# Optional feature: what debug-toolbar and Sentry see of async calls
# ---------------------------------------------------------------------------
# debug-toolbar's cache panel and Sentry wrap the sync methods of the cache objects they
# watch; Django's backends reach the wrappers from async methods through sync_to_async, ours
# never call the sync twin, so an async call reports to the tool itself, with its real
# duration. At the method layer, not the policy's hooks: tools wrap one cache object's methods
# and see the client-side store's answers, which never reach the policy. Where no tool
# watches, an async call pays one dict lookup; neither tool is imported unless it wrapped one.


async def _observed(
    cache: Any, name: str, work: Coroutine[Any, Any, _T], args: Any, kwargs: Any
) -> _T:
    state = cache.__dict__
    if state.get("_sentry_patched") and _sentry_watches(name):
        work = _sentry_span(cache, name, work, args, kwargs)
    panel = state.get("_djdt_panel")
    if panel is None or not _toolbar_watches(name):
        return await work
    started = time.perf_counter()
    value = await work  # a call that raises is not recorded, as the toolbar does for sync
    _toolbar_record(cache, panel, name, time.perf_counter() - started, value, args, kwargs)
    return value


def _toolbar_watches(name: str) -> bool:
    from debug_toolbar.panels.cache import WRAPPED_CACHE_METHODS  # type: ignore[import-not-found, import-untyped, unused-ignore]

    return name in WRAPPED_CACHE_METHODS


def _toolbar_record(
    cache: Any, panel: Any, name: str, elapsed: float, value: Any, args: Any, kwargs: Any
) -> None:
    """What the toolbar's sync wrapper records, through the panel's recorder (unchanged from
    debug-toolbar 4.2 to 8.0); the stack trace ends at the caller's await."""
    from debug_toolbar import utils  # type: ignore[import-not-found, import-untyped, unused-ignore]

    toolbar = cast(Any, utils)  # untyped
    alias = next((a for each, a in panel.initialized_caches() if each is cache), "?")
    try:
        panel._store_call_info(
            name=name,
            time_taken=elapsed,
            return_value=value,
            args=args,
            kwargs=kwargs,
            trace=toolbar.get_stack_trace(skip=3),  # this function, _observed, the a-method
            template_info=toolbar.get_template_info(),
            backend=f"{alias} ({type(cache).__name__})",
        )
    except (AttributeError, TypeError) as error:  # a toolbar whose recorder changed
        logger.debug("debug-toolbar did not take the call of a%s: %s", name, error)


def _sentry_watches(name: str) -> bool:
    import sentry_sdk  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from sentry_sdk.integrations.django import DjangoIntegration  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from sentry_sdk.integrations.django.caching import METHODS_TO_INSTRUMENT  # type: ignore[import-not-found, import-untyped, unused-ignore]

    client = sentry_sdk.get_client()
    return name in METHODS_TO_INSTRUMENT and client.get_integration(DjangoIntegration) is not None


async def _sentry_span(
    cache: Any, name: str, work: Coroutine[Any, Any, _T], args: Any, kwargs: Any
) -> _T:
    """The span Sentry's wrapper makes for the sync twin, field for field, around ``work``."""
    import sentry_sdk  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from sentry_sdk import tracing_utils  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from sentry_sdk.consts import OP, SPANDATA  # type: ignore[import-not-found, import-untyped, unused-ignore]
    from sentry_sdk.integrations.django import DjangoIntegration  # type: ignore[import-not-found, import-untyped, unused-ignore]

    op = OP.CACHE_PUT if name.startswith("set") else OP.CACHE_GET
    first = args[0] if args else kwargs.get("key", kwargs.get("keys", kwargs.get("data")))
    keys = tuple(first) if isinstance(first, (dict, list, tuple)) else (first,)
    description = ", ".join(k.decode() if isinstance(k, bytes) else str(k) for k in keys)
    span: Any
    streams = getattr(tracing_utils, "has_span_streaming_enabled", None)  # Sentry 2's switch
    if streams is None or streams(sentry_sdk.get_client().options):  # Sentry 3 only streams
        if sentry_sdk.traces.get_current_span() is None:
            return await work
        attributes: dict[str, Any] = {"sentry.op": op, "sentry.origin": DjangoIntegration.origin}
        span = sentry_sdk.traces.start_span(name=description, attributes=attributes)
        put = span.set_attribute
    else:
        span = sentry_sdk.start_span(op=op, name=description, origin=DjangoIntegration.origin)
        put = span.set_data
    with span:
        value = await work
        url = urlsplit(cache._servers[0])
        put(SPANDATA.NETWORK_PEER_ADDRESS, f"{url.scheme}://{url.hostname or ''}{url.path}")
        if url.port is not None:
            put(SPANDATA.NETWORK_PEER_PORT, url.port)
        put(SPANDATA.CACHE_KEY, keys)
        if name in ("get", "get_many"):
            default = {} if name == "get_many" else _default_of(args, kwargs)
            put(SPANDATA.CACHE_HIT, value != default)
            if value != default:
                put(SPANDATA.CACHE_ITEM_SIZE, len(str(value)))
        elif args:  # set: the value's size; set_many: the mapping's
            put(SPANDATA.CACHE_ITEM_SIZE, len(str(args[1] if len(args) >= 2 else args[0])))
        return value


def _default_of(args: Any, kwargs: Any) -> Any:
    return args[1] if len(args) >= 2 else kwargs.get("default")


def _features_for(
    topology: _Topology, store: _AnyStore | None, stats: _Stats, prefix: str
) -> tuple[_Feature, ...]:
    """A configuration's features on one path; the breaker reroutes before the store adds."""
    tracing = _Tracing(topology, prefix) if _tracing() else None  # set up before the call
    found = (stats, _breakers_for(topology), store, tracing)
    return tuple(feature for feature in found if feature is not None)


# ---------------------------------------------------------------------------
# The shells: they perform what the policy asks, on redis-py's sync and asyncio clients
# ---------------------------------------------------------------------------


class _Shell:
    """What both shells share: the policy they serve, and the names of Django's
    RedisCacheClient that Django's own test suite reads (_servers, _serializer, ...)."""

    path_prefix = ""  # what the cache methods of this path start with: "a" for asyncio

    def __init__(self, topology: _Topology, features: tuple[_Feature, ...] = ()) -> None:
        self._topology, self._config = topology, topology.config
        self._policy = _Policy(topology, features, self.path_prefix)
        self._servers, self._serializer = topology.servers, topology.config.codec
        # On a cluster, the shells route each command themselves (unless redis-py does).
        routed = isinstance(topology, _Cluster) and topology.config.direct
        self._cluster = cast(_Cluster, topology) if routed else None

    def _get_connection_pool_index(self, write: bool) -> int:
        return self._topology.index_for(write)


_UTF8 = dict.fromkeys(("utf-8", "utf8", "UTF-8", "UTF8", "utf_8", "UTF_8"), True)


def _packed(connection: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """The wire form of ``commands``, as redis-py packs it but several times faster for what
    operations send (str, bytes and int arguments: 40 us instead of 280 us for an MGET of 100
    keys); anything else is left to redis-py. Strings are encoded as OPTIONS ``encoding``
    says on both paths (redis-py's hiredis packer, on the sync path, writes UTF-8 anyway)."""
    encoder = connection.encoder
    encoding, errors = encoder.encoding, encoder.encoding_errors
    utf8 = _UTF8.get(encoding) is not None and errors == "strict"
    if utf8 and len(commands) == 1 and len(commands[0]) == 2:  # GET key, and the like
        name, key = commands[0]
        if type(key) is str and type(name) is str and key.isascii():
            return [f"*2\r\n${len(name)}\r\n{name}\r\n${len(key)}\r\n{key}\r\n".encode()]
    chunks: list[bytes] = []
    pieces: list[bytes] = []
    for command in commands:
        if utf8 and len(command) > 8:  # many keys (MGET, DEL): as one string, if ASCII
            with contextlib.suppress(TypeError):
                text = "".join(command)  # a TypeError if any is not a str
                if text.isascii():
                    body = "".join([f"${len(arg)}\r\n{arg}\r\n" for arg in command])
                    pieces.append(f"*{len(command)}\r\n{body}".encode())
                    continue
        pieces.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is str:
                arg = arg.encode() if utf8 else arg.encode(encoding, errors)
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes:  # floats, bools (refused), memoryviews: redis-py's way
                return cast(list[bytes], connection.pack_commands(commands))
            if len(arg) > 6000:  # a large value goes out as it is, not copied
                pieces.append(b"$%d\r\n" % len(arg))
                chunks += (b"".join(pieces), arg)
                pieces = [b"\r\n"]
            else:
                pieces.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    chunks.append(b"".join(pieces))
    return chunks


def _sync_call(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """The replies of ``commands`` sent together on one of ``client``'s pooled connections:
    values, or ``ResponseError`` objects for error replies. A connection that fails midway
    is closed, so no reply is left on it for the next user."""
    return _sync_replies(client, _sync_sent(client, commands), commands)


def _sync_sent(client: redis.Redis, commands: list[tuple[Any, ...]]) -> Any:
    """A pooled connection of ``client`` on which ``commands`` went out: written to its
    socket here when connected and without a health check interval (redis-py's
    ``send_packed_command`` otherwise)."""
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        chunks = _packed(connection, commands)
        sock = connection._sock
        if sock is None or connection.health_check_interval:
            connection.send_packed_command(chunks)  # type: ignore[no-untyped-call, unused-ignore]
        else:
            try:
                _write(sock, chunks)
            except TimeoutError as error:  # socket.timeout; the OS's (an errno): a dead peer
                if error.errno:
                    raise redis.ConnectionError(
                        f"Error while writing to socket. {error}"
                    ) from error
                raise redis.TimeoutError("Timeout writing to socket") from None
            except OSError as error:
                raise redis.ConnectionError(f"Error while writing to socket. {error}") from error
    except BaseException:
        connection.disconnect()  # type: ignore[no-untyped-call, unused-ignore]
        pool.release(connection)
        raise
    return connection


def _sync_replies(
    client: redis.Redis, connection: Any, commands: list[tuple[Any, ...]]
) -> list[Any]:
    """The replies of ``commands``, sent on ``connection``, which goes back to the pool.
    The first ones, if simple, are read from its socket here (``_taken``); the rest by
    redis-py's parser."""
    try:
        callbacks = _callbacks(client)
        replies = []
        taken = _taken(connection, len(commands))
        for at, command in enumerate(commands):
            try:
                reply = taken[at] if at < len(taken) else connection.read_response()
            except redis.ResponseError as error:
                reply = error
            else:
                callback = callbacks.get(command[0])
                if callback is not None:
                    reply = callback(reply)
            replies.append(reply)
        return replies
    except BaseException:
        connection.disconnect()
        raise
    finally:
        client.connection_pool.release(connection)


def _callbacks(client: redis.Redis) -> dict[str, Callable[..., Any]]:
    """``client``'s response callbacks, as they were at its first call here: a plain dict
    (redis-py's is case-insensitive, a Python call per lookup), and the replies the
    operations expect whatever a raw client's user sets later."""
    callbacks: dict[str, Callable[..., Any]] | None = client.__dict__.get(
        "_django_redis_ex_callbacks"
    )
    if callbacks is None:
        callbacks = client.__dict__["_django_redis_ex_callbacks"] = dict(client.response_callbacks)
    return callbacks


def _write(sock: socket.socket, chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``sock``: on a plain socket by ``os.write`` while the kernel
    takes them (one system call, not the poll and send of a socket with a timeout)."""
    if type(sock) is socket.socket:
        fd = sock.fileno()
        for at, chunk in enumerate(chunks):
            try:
                written = os.write(fd, chunk)
            except BlockingIOError:
                written = 0
            if written < len(chunk):  # the kernel's buffer is full: wait as sendall waits
                sock.sendall(memoryview(chunk)[written:])
                for rest in chunks[at + 1 :]:
                    sock.sendall(rest)
                return
        return
    for chunk in chunks:
        sock.sendall(chunk)


def _taken(connection: Any, count: int) -> list[Any]:
    """Up to ``count`` replies read from ``connection``'s socket and parsed here, while
    each is simple (status, integer, bulk string, null), as redis-py's Python parsers read
    them (undecoded), without their buffer's layers; the bytes past them go to that
    buffer for the parser. None taken (and nothing read) unless the parser's buffer is
    empty and replies are not decoded, nor health-checked."""
    parser = connection._parser
    quick = connection.__dict__.get("_django_redis_ex_quick")
    if quick is None or quick[0] is not parser:  # the same for the connection's life
        ok = type(parser) in _QUICK_PARSERS and not connection.encoder.decode_responses
        quick = connection._django_redis_ex_quick = (
            parser,
            ok and not connection.health_check_interval,
        )
    buffered = parser._buffer
    if not quick[1] or buffered is None:
        return []
    try:  # nothing unread in it (SocketBuffer.unread_bytes, inline)
        buffer = buffered._buffer
        position = buffer.tell()
        if buffer.seek(0, io.SEEK_END) != position:
            buffer.seek(position)
            return []
    except (AttributeError, ValueError):  # closed meanwhile: the parser says so
        return []
    sock = connection._sock
    data = _received(sock)
    taken: list[Any] = []
    at = 0
    while len(taken) < count and data[at : at + 1] in _SIMPLE_FIRSTS:
        frame = _resp3(data, at)
        if frame is _MISSING:  # not whole yet (a large value): the parser reads the rest
            break
        taken.append(frame[0])
        at = frame[1]
    if at < len(data):  # the rest, for the parser: as its own reads would have left it
        buffer = buffered._buffer
        position = buffer.tell()
        buffer.seek(0, io.SEEK_END)
        buffer.write(data[at:])
        buffer.seek(position)
    return taken


_SIMPLE_FIRSTS = frozenset((b"+", b":", b"$", b"_"))
_QUICK_PARSERS = (redis._parsers._RESP2Parser, redis._parsers._RESP3Parser)


def _received(sock: socket.socket) -> bytes:
    """What ``sock`` holds (waiting for it up to its timeout), as redis-py reads it."""
    try:
        data = sock.recv(65536)
    except TimeoutError as error:  # socket.timeout; the OS's (an errno): a dead peer
        if error.errno:
            raise redis.ConnectionError(f"Error while reading from socket: {error}") from error
        raise redis.TimeoutError("Timeout reading from socket") from None
    except OSError as error:
        raise redis.ConnectionError(f"Error while reading from socket: {error.args}") from error
    if not data:
        raise redis.ConnectionError("Connection closed by server.")
    return data


def _sync_routed(cluster: _Cluster, commands: list[tuple[Any, ...]]) -> list[Any]:
    """``_sync_call`` on a cluster: each command to its slot's primary (``_Cluster.route``),
    those for several nodes written to all before any reply is read."""
    node = cluster.one_node(commands)
    if node is not None:  # the usual call: to one node, which holds its slot
        try:
            answered = _sync_call(cluster.node_client(node), commands)
        except Exception:
            cluster.slots.stale = True  # a failover may have moved its slots
            raise
        if not _redirected(answered):
            return answered
    steps = cluster.route(commands, None if node is None else (node, answered))
    try:
        request = next(steps)
        while True:
            if type(request) is float:
                time.sleep(request)
                request = steps.send(None)
                continue
            if len(request) == 1:
                node, sent = request[0]
                try:
                    outcomes: list[Any] = [_sync_call(cluster.node_client(node), sent)]
                except Exception as error:
                    outcomes = [error]
            else:
                outcomes = _sync_each(cluster, request)
            request = steps.send(outcomes)
    except StopIteration as done:
        replies: list[Any] = done.value
        return replies


def _sync_each(cluster: _Cluster, sends: list[tuple[str, list[tuple[Any, ...]]]]) -> list[Any]:
    """The replies of each node's commands, or its exception: all are written first, then
    read. Connections are taken in the nodes' order, so two threads that each need several
    of a node's few connections never wait on each other."""
    order = sorted(range(len(sends)), key=lambda i: sends[i][0])
    outcomes: list[Any] = [None] * len(sends)
    held: list[tuple[int, redis.Redis, Any]] = []
    try:
        for i in order:
            client = cluster.node_client(sends[i][0])
            try:
                held.append((i, client, _sync_sent(client, sends[i][1])))
            except Exception as error:
                outcomes[i] = error
        while held:
            i, client, connection = held.pop(0)
            try:
                outcomes[i] = _sync_replies(client, connection, sends[i][1])
            except Exception as error:
                outcomes[i] = error
    finally:
        for _, client, connection in held:  # interrupted: replies are left unread on them
            connection.disconnect()
            client.connection_pool.release(connection)
    return outcomes


def _sync_pipelined(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """The replies of ``commands`` through redis-py's own command path (a cluster client,
    or OPTIONS that ask for redis-py's retries), error replies as objects."""
    if len(commands) == 1:
        try:
            return [client.execute_command(*commands[0])]  # type: ignore[no-untyped-call, unused-ignore]
        except redis.ResponseError as error:
            return [error]
    pipeline = client.pipeline(transaction=False)
    for args in commands:
        pipeline.execute_command(*args)  # type: ignore[no-untyped-call, unused-ignore]
    return pipeline.execute(raise_on_error=False)


_AWAITABLE_DEFAULT = (
    "get_or_set() got a default that returns an awaitable (a coroutine function?): call "
    "aget_or_set() to have it awaited; nothing was stored."
)


class _SyncShell(_Shell):
    """Performs the policy's requests on ``redis.Redis`` clients of the process-wide registry."""

    def __init__(self, topology: _Topology, features: tuple[_Feature, ...] = ()) -> None:
        super().__init__(topology, features)
        self._pool_options = topology.config.sync_options  # Django's name
        self._clients: list[redis.Redis | None] = [None] * (topology.readers + 1)
        self._direct = topology.config.direct

    def run(self, plan: Plan[_T]) -> _T:
        steps = self._policy.run(plan)
        try:
            request = next(steps)
            while True:
                try:
                    if type(request) is tuple and self._direct:  # the usual request
                        if self._cluster is not None:
                            reply = _sync_routed(self._cluster, request[1])
                        else:
                            client = self._clients[request[0]] or self._client_at(request[0])
                            reply = _sync_call(client, request[1])
                    else:
                        reply = self._perform(request)
                except BaseException as error:  # the policy decides what follows
                    request = steps.throw(error)
                else:
                    request = steps.send(reply)
        except StopIteration as done:
            result: _T = done.value
            return result

    def _perform(self, request: Request) -> Any:
        if type(request) is tuple:
            if self._cluster is not None and self._config.direct:
                return _sync_routed(self._cluster, request[1])
            client = self._client_at(request[0])
            if self._config.direct:
                return _sync_call(client, request[1])
            return _sync_pipelined(client, request[1])
        if type(request) is _Sleep:
            time.sleep(request.seconds)
            return time.monotonic()
        if type(request) is _Background:
            return _INLINE
        compute = cast(_Compute, request)
        try:
            value = compute.default()
        except Exception as error:
            if not compute.catch:
                raise
            return _Failed(error)
        if inspect.isawaitable(value):  # a coroutine function's, on the sync path
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError(_AWAITABLE_DEFAULT)
        return value

    def get_client(self, key: Any = None, *, write: bool = False) -> redis.Redis:
        return self._client_at(self._topology.index_for(write))

    def _get_connection_pool(self, write: bool) -> redis.ConnectionPool:
        return self.get_client(write=write).connection_pool

    def _client_at(self, index: int) -> redis.Redis:
        client = self._clients[index]
        if client is None:
            client = self._clients[index] = self._topology.sync_client(index)
        return client


class _Call:
    """Commands of one call on a multiplexed line, and the future of their replies."""

    __slots__ = ("commands", "future")

    def __init__(self, commands: list[tuple[Any, ...]], future: asyncio.Future[list[Any]]) -> None:
        self.commands = commands
        self.future = future


class _Line:
    """One connection that the concurrent calls of an event loop share (multiplexing). Calls
    queue their commands; once per loop iteration the queue goes out in one write, pipelined
    behind whatever is in flight, and one reader task hands each call its own replies in
    order (an error reply is its call's alone). A call cancelled in flight has its replies
    read and dropped, so no other call's reply shifts. One timer bounds the wait for the next
    reply (``socket_timeout``), not redis-py's ``wait_for`` around every read. The line holds
    a pooled connection while calls are in flight (the pool bounds and checks connections)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.pool = pool = client.connection_pool
        # Parsers whose replies _quick_reply may take first (none if replies are decoded).
        quick = not pool.connection_kwargs.get("decode_responses")
        self.quick = (redis._parsers._AsyncRESP3Parser, redis._parsers._AsyncRESP2Parser) * quick
        self.callbacks: Mapping[Any, Any] = client.response_callbacks
        self.timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self.connection: Any = None
        self.queue: list[_Call] = []
        self.sent: collections.deque[_Call] = collections.deque()
        self.reader: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None  # what the idle reader waits on
        self.flushing = False
        self.progress = 0.0  # loop time of the last reply, or of a send after none in flight
        self.watchdog: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.looked = False  # the timer, when due, looked once more for bytes
        self.connecting = False  # the reader is getting a connection

    async def call(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of ``commands``, in order: values or ``ResponseError`` objects."""
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        self.queue.append(_Call(commands, future))
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)
        try:
            return await future
        except _Unshared:  # a large value: on a pooled connection of its own
            return await _async_pipelined(self.client, commands)

    def _flush(self) -> None:
        self.flushing = False
        if self.reader is None:
            self.reader = self.loop.create_task(self._read())
            self.reader._log_destroy_pending = False  # type: ignore[attr-defined]  # dropped loops
        elif self.wake is not None:  # idle: the reader checks the connection, then sends
            if not self.wake.done():
                self.wake.set_result(None)
        elif (
            self.connection is not None
            and not self.connecting  # connected, maybe, but not yet through its handshake
            and self.connection.is_connected
            and not getattr(self.pool, "_queue", None)  # others wait: the reader hands it over
        ):
            with contextlib.suppress(redis.ConnectionError):  # its reader sees the close
                self._send()
        # else the reader is connecting (or handing the connection over): it sends the queue

    def _send(self) -> None:
        calls, self.queue = self.queue, []
        sent = [call for call in calls if not call.future.done()]  # not if cancelled already
        try:  # usually every call packs at once into one piece
            chunks = _packed(self.connection, [each for call in sent for each in call.commands])
        except Exception:
            chunks = []
        if len(chunks) != 1:
            chunks, sent = self._packed_each(sent)
        if not sent:
            return
        try:
            self.connection._writer.writelines(chunks)
        except Exception as error:  # a transport closed under the line (3.13 raises here)
            failure = redis.ConnectionError(f"Error while writing to Redis: {error!r}")
            _fail(sent, failure)
            raise failure from error
        if not self.sent:
            self.progress = self.loop.time()
        self.sent.extend(sent)
        if self.watchdog is None and self.timeout:
            self.watchdog = self.loop.call_at(self.progress + self.timeout, self._check)

    def _packed_each(self, calls: list[_Call]) -> tuple[list[bytes], list[_Call]]:
        """Call by call: one whose arguments cannot be encoded fails alone, and one with a
        value the server may refuse (it then closes the connection) or slow to send goes on
        a connection of its own, not behind or before others."""
        chunks, sent = [], []
        for call in calls:
            try:
                packed = _packed(self.connection, call.commands)
            except Exception as error:  # an argument redis-py cannot encode: this call's
                call.future.set_exception(error)
                continue
            if len(packed) > 1 and any(len(chunk) > _LARGE_VALUE for chunk in packed):
                call.future.set_exception(_Unshared())
                continue
            chunks += packed
            sent.append(call)
        return chunks, sent

    def _check(self) -> None:
        """The timer: no reply for ``socket_timeout`` with calls in flight ends the reader."""
        self.watchdog = None
        if not self.sent or self.reader is None or not self.timeout:
            return
        now = self.loop.time()
        if now - self.progress < self.timeout:
            self.looked = False
            self.watchdog = self.loop.call_at(self.progress + self.timeout, self._check)
        elif not self.looked:
            # Bytes may be waiting unread: the loop was held up, or the stream was paused
            # (flow control) and resumes in this iteration. A timer due now runs after the
            # next poll's reads (call_soon would run before them): one more look then.
            self.looked = True
            self.watchdog = self.loop.call_at(now, self._check)
        else:
            self.timed_out = True
            self.reader.cancel()

    async def _ready(self) -> None:
        """A connection to send on: the pool checks one it hands out. Bytes arriving on
        it count as progress for the timer: a large reply is slow, not frozen."""
        if self.connection is None:
            self.connection = await self.pool.get_connection()  # type: ignore[no-untyped-call, unused-ignore]
        elif not self.connection.is_connected:
            await self.connection.connect()
        stream = self.connection._reader
        if stream is not None and not getattr(stream, "_django_redis_ex_watched", False):
            feed = stream.feed_data

            def fed(data: bytes) -> None:
                self.progress = self.loop.time()
                feed(data)

            stream.feed_data = fed
            stream._django_redis_ex_watched = True

    async def _read(self) -> None:
        error: BaseException | None = None  # None: the loop is shutting down
        self.connecting = False
        try:
            while True:
                if not self.sent:
                    await self._idle()
                    continue
                await self._answer(self.sent[0])
        except asyncio.CancelledError:
            if not self.timed_out:
                raise
            error = redis.TimeoutError(
                f"Timeout reading from {self.connection._host_error()}: no reply within "
                f"socket_timeout ({self.timeout} s)."
            )
        except Exception as exc:
            error = exc
            if isinstance(exc, OSError):
                error = redis.ConnectionError(f"Error while reading from Redis: {exc}")
        finally:
            await self._end(error)

    async def _answer(self, call: _Call) -> None:
        """Read the replies of the call first in line, and hand them to it."""
        parser, stream = self.connection._parser, self.connection._reader
        quick = type(parser) in self.quick and not parser._buffer
        replies = []
        for command in call.commands:
            reply = _quick_reply(stream) if quick else _MISSING
            if reply is _MISSING:
                reply = await parser.read_response()
                quick = False
            callback = self.callbacks.get(command[0])
            if callback is not None and not isinstance(reply, _ResponseError):
                reply = callback(reply)
            replies.append(reply)
        self.sent.popleft()
        self.progress = self.loop.time()
        if not call.future.done():
            call.future.set_result(replies)

    async def _idle(self) -> None:
        """No call in flight: give the connection back if others wait for one (a raw client,
        a lock) or no call comes; wait for calls; send them."""
        if self.connection is not None and getattr(self.pool, "_queue", None):
            # This one goes back, and the line waits its turn for one like the others.
            connection, self.connection = self.connection, None
            await self.pool.release(connection)
        elif not self.queue and self.connection is not None:
            await asyncio.sleep(0)  # whoever was just answered may call again
            if not self.queue and not self.sent:  # idle: the pool has it back
                connection, self.connection = self.connection, None
                await self.pool.release(connection)
        if self.sent:  # a flush due in that iteration sent what came meanwhile: read it
            return
        if not self.queue:
            self.wake = self.loop.create_future()
            try:
                await self.wake
            finally:
                self.wake = None
            return
        self.connecting = True
        await self._ready()
        self.connecting = False
        self._send()

    async def _end(self, error: BaseException | None) -> None:
        """After the reader: fail the calls in flight, and give the connection back (closed,
        unless it ends idle with the loop). The calls not yet sent fail too if Redis could
        not be reached or the loop ends; otherwise a new reader sends them."""
        self.reader, self.timed_out, self.looked = None, False, False
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        failed, self.sent = self.sent, collections.deque()
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                if failed or error is not None:  # replies may be left unread
                    await connection.disconnect(nowait=True)
                await self.pool.release(connection)
        closing = error is None
        if error is None:
            error = redis.ConnectionError("The event loop closed with this call in flight.")
        _fail(failed, error)
        if self.connecting or closing:
            queued, self.queue = self.queue, []
            _fail(queued, error)
        elif self.queue and not self.loop.is_closed():
            self._flush()


def _quick_reply(stream: Any) -> Any:
    """A status, integer, bulk string or null reply whole in ``stream``'s buffer, taken from
    it as redis-py's Python parsers read it (undecoded), without their four coroutines a
    reply; ``_MISSING`` for anything else, which the parser reads."""
    buffer = stream._buffer
    if not buffer or buffer[0] not in _SIMPLE_REPLIES:
        return _MISSING
    taken = _resp3(buffer, 0)
    if taken is _MISSING:
        return _MISSING
    del buffer[: taken[1]]
    stream._maybe_resume_transport()  # as StreamReader.read does: flow control
    return taken[0]


_SIMPLE_REPLIES = b"+:$_"  # status, integer, bulk string (or RESP2's null), RESP3's null


def _fail(calls: Iterable[_Call], error: BaseException) -> None:
    """Each call not answered yet fails with its own copy of ``error``."""
    for call in calls:
        if not call.future.done():
            call.future.set_exception(_own_copy(error))


class _Unshared(Exception):
    """A call the line will not multiplex: it goes on a pooled connection of its own."""


def _own_copy(error: BaseException) -> BaseException:
    """``error`` for one of several callers: one exception raised in many tasks would
    gather all their tracebacks."""
    try:
        copy = type(error)(*error.args)
    except Exception:  # an exception class with a signature of its own
        return error
    copy.__cause__ = error.__cause__
    return copy


async def _async_pipelined(
    client: redis.asyncio.Redis, commands: list[tuple[Any, ...]]
) -> list[Any]:
    """``_sync_pipelined`` for asyncio."""
    if len(commands) == 1:
        try:
            return [await client.execute_command(*commands[0])]  # type: ignore[no-untyped-call, unused-ignore]
        except redis.ResponseError as error:
            return [error]
    pipeline = client.pipeline(transaction=False)
    for args in commands:
        pipeline.execute_command(*args)
    replies: list[Any] = await pipeline.execute(raise_on_error=False)
    return replies


def _line_of(client: redis.asyncio.Redis) -> _Line:
    """The multiplexed line of a loop's client (made at first use)."""
    line: _Line | None = client.line  # type: ignore[attr-defined]
    if line is None:
        line = client.line = _Line(client)  # type: ignore[attr-defined]
    return line


async def _async_routed(cluster: _Cluster, commands: list[tuple[Any, ...]]) -> list[Any]:
    """``_sync_routed`` for asyncio: each node's commands on its line, all nodes at once."""
    node = cluster.one_node(commands)
    if node is not None:
        try:
            if cluster.config.multiplex:  # (inline: a coroutine less on the usual path)
                line = _line_of(_registry.async_client(cluster.node(node), 0))
                answered: list[Any] = await line.call(commands)
            else:
                answered = await _async_node_call(cluster, node, commands)
        except Exception:
            cluster.slots.stale = True
            raise
        if not _redirected(answered):
            return answered
    steps = cluster.route(commands, None if node is None else (node, answered))
    try:
        request = next(steps)
        while True:
            if type(request) is float:
                await asyncio.sleep(request)
                request = steps.send(None)
                continue
            if len(request) == 1:
                node, sent = request[0]
                try:
                    outcomes: list[Any] = [await _async_node_call(cluster, node, sent)]
                except Exception as error:
                    outcomes = [error]
            else:
                calls = (_async_node_call(cluster, node, sent) for node, sent in request)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            request = steps.send(outcomes)
    except StopIteration as done:
        replies: list[Any] = done.value
        return replies


async def _async_node_call(cluster: _Cluster, node: str, commands: list[tuple[Any, ...]]) -> Any:
    client = _registry.async_client(cluster.node(node), 0)
    if cluster.config.multiplex:
        return await _line_of(client).call(commands)
    return await _async_pipelined(client, commands)


_background_tasks: set[asyncio.Task[None]] = set()  # where a loop takes no attribute (uvloop)


def _hold(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    """Hold ``task`` until it is done (asyncio holds tasks weakly), on its loop if it takes
    an attribute: a loop dropped unclosed is then collected with its pending task."""
    try:
        held = loop.__dict__.setdefault("_django_redis_ex_tasks", set())
    except AttributeError:
        held = _background_tasks
    held.add(task)
    task.add_done_callback(held.discard)


class _AsyncShell(_Shell):
    """Performs the policy's requests on the running loop's clients, on its multiplexed line."""

    path_prefix = "a"

    def __init__(self, topology: _Topology, features: tuple[_Feature, ...] = ()) -> None:
        super().__init__(topology, features)
        self._pool_options = topology.config.async_options  # Django's name
        self._multiplex = topology.config.multiplex

    async def run(self, plan: Plan[_T]) -> _T:
        steps = self._policy.run(plan)
        try:
            request = next(steps)
            while True:
                try:
                    if type(request) is tuple and self._multiplex:  # the usual request
                        if self._cluster is not None:
                            reply = await _async_routed(self._cluster, request[1])
                        else:
                            client = _registry.async_client(self._topology, request[0])
                            reply = await _line_of(client).call(request[1])
                    else:
                        reply = await self._perform(request)
                except BaseException as error:  # cancelled too: the policy undoes and ends
                    request = steps.throw(error)
                else:
                    request = steps.send(reply)
        except StopIteration as done:
            result: _T = done.value
            return result

    async def _perform(self, request: Request) -> Any:
        if type(request) is tuple:
            if self._cluster is not None:
                return await _async_routed(self._cluster, request[1])
            # Looked up each call: a client kept here would keep its loop alive.
            client = _registry.async_client(self._topology, request[0])
            if self._config.multiplex:
                return await _line_of(client).call(request[1])
            return await _async_pipelined(client, request[1])
        if type(request) is _Sleep:
            await asyncio.sleep(request.seconds)
            return asyncio.get_running_loop().time()
        if type(request) is _Background:
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._background(request.plan))
            _hold(loop, task)
            return _MISSING
        compute = cast(_Compute, request)
        try:
            value = compute.default()
            return (await value) if inspect.isawaitable(value) else value
        except Exception as error:
            if not compute.catch:
                raise
            return _Failed(error)

    async def _background(self, plan: Plan[Any]) -> None:
        """Run ``plan`` in a task of its own: its errors are logged (nobody awaits it). A loop
        closed first cancels it; what it holds (a lock) is let go as the task ends."""
        try:
            await self.run(plan)
        except Exception:
            logger.warning("%s failed in the background.", plan.method, exc_info=True)

    def get_client(self, key: Any = None, *, write: bool = False) -> redis.asyncio.Redis:
        return _registry.async_client(self._topology, self._topology.index_for(write))

    def _get_connection_pool(self, write: bool) -> redis.asyncio.ConnectionPool:
        index = self._topology.index_for(write)
        if asyncio._get_running_loop() is None:  # Django's test_redis_pool_options: a new pool
            return self._topology.make_async(index).connection_pool
        return _registry.async_client(self._topology, index).connection_pool


# ---------------------------------------------------------------------------
# The cache classes: keys, versions and timeouts; no Redis commands
# ---------------------------------------------------------------------------

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_Cache = TypeVar("_Cache", bound="_RedisEXBase")
_P = ParamSpec("_P")
_F = TypeVar("_F", bound=Callable[..., Any])


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


def _text(redis_key: bytes | str) -> str:
    return redis_key.decode() if isinstance(redis_key, bytes) else redis_key


def _twins(
    plan: Callable[Concatenate[_Cache, _P], Plan[_T]],
    local: Callable[Concatenate[_Cache, _P], Any] | None = None,
) -> tuple[
    Callable[Concatenate[_Cache, _P], _T],
    Callable[Concatenate[_Cache, _P], Coroutine[Any, Any, _T]],
]:
    """A cache method and its native async twin, made from the method that plans them:
    ``get, aget = _twins(_plan_get)``; type checkers see the plan's signature on both. A
    read's ``local`` answers from the client-side store first, if any (``_MISSING``: ask
    Redis). An async call whose sync twin a tool wrapped (debug-toolbar, Sentry) reports to
    that tool (``_observed``)."""
    name = plan.__name__.removeprefix("_plan_")

    def method(self: _Cache, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if local is not None and self._store is not None:
            found = local(self, *args, **kwargs)
            if found is not _MISSING:
                return cast(_T, found)
        return self._sync_driver.run(plan(self, *args, **kwargs))

    async def amethod(self: _Cache, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        found = _MISSING
        if local is not None and self._store is not None:
            found = local(self, *args, **kwargs)
        if found is _MISSING:
            work = self._async_driver.run(plan(self, *args, **kwargs))
        else:
            if name not in self.__dict__:
                return cast(_T, found)
            work = _value(found)
        if name in self.__dict__:
            return await _observed(self, name, work, args, kwargs)
        return await work

    return _like(method, plan, ""), _like(amethod, plan, "a")


async def _value(value: Any) -> Any:
    return value


_Pages = Callable[[int], Plan[_Page]]  # an iteration: the plan of its page at a cursor


def _iteration_twins(
    pages: Callable[Concatenate[_Cache, _P], _Pages],
) -> tuple[
    Callable[Concatenate[_Cache, _P], Iterator[Any]],
    Callable[Concatenate[_Cache, _P], AsyncIterator[Any]],
]:
    """``_twins`` for an iteration: lazy iterators, a call (a round trip) per page."""

    def method(self: _Cache, /, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[Any]:
        page, cursor = pages(self, *args, **kwargs), -1
        while cursor:
            cursor, found = self._sync_driver.run(page(max(cursor, 0)))
            yield from found

    async def amethod(self: _Cache, /, *args: _P.args, **kwargs: _P.kwargs) -> AsyncIterator[Any]:
        page, cursor = pages(self, *args, **kwargs), -1
        while cursor:
            cursor, found = await self._async_driver.run(page(max(cursor, 0)))
            for each in found:
                yield each

    return _like(method, pages, ""), _like(amethod, pages, "a")


def _like(function: _F, plan: Callable[..., Any], prefix: str) -> _F:
    """``function`` named, documented and signed as the method ``plan`` plans, so that
    ``help()``, ``inspect.signature`` and debuggers show the method's own."""
    name = prefix + plan.__name__.removeprefix("_plan_")
    function.__name__, function.__doc__, function.__module__ = name, plan.__doc__, __name__
    function.__qualname__ = f"{plan.__qualname__.rpartition('.')[0]}.{name}"
    signature = inspect.signature(plan)
    returns = str(signature.return_annotation)  # "Plan[int]": the method returns an int
    if returns == "_Pages":  # an iteration
        returns = "AsyncIterator[Any]" if prefix else "Iterator[Any]"
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        return_annotation=returns[5:-1] if returns.startswith("Plan[") else returns
    )
    return function


def _reverse_key_function(path: Any) -> Callable[[str], str] | None:
    """The CACHES entry's REVERSE_KEY_FUNCTION (django-redis's place for it), imported."""
    if path is None:
        return None
    function = import_string(path) if isinstance(path, str) else path
    if not callable(function):
        raise ImproperlyConfigured("REVERSE_KEY_FUNCTION must be a callable or its dotted path.")
    return cast(Callable[[str], str], function)


class _DjangoRedisClient:
    """What django-redis code reaches through ``cache.client``."""

    def __init__(self, cache: _RedisEXBase) -> None:
        self._cache = cache

    def get_client(self, write: bool = True, tried: Any = None) -> redis.Redis:
        """django-redis's signature: ``write`` first."""
        return self._cache.get_client(write=write)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class _RedisEXBase(BaseCache):
    """Django's cache API and django-redis's extras, sync and native async: each method is
    planned once, in ``_plan_<method>`` (an operation and its fallback), and ``_twins`` makes
    the sync method and its ``a`` twin from the plan, which differ only in their driver."""

    _client_kind: str

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(params)
        self._servers = re.split("[;,]", server) if isinstance(server, str) else list(server)
        if not all("://" in url for url in self._servers):
            raise ImproperlyConfigured(
                "LOCATION lists Redis URLs (redis://, rediss://, unix://), split on ',' and "
                "';': percent-encode those characters in a password."
            )
        cls = type(self)
        self._default_key_methods = (
            cls.make_and_validate_key is BaseCache.make_and_validate_key
            and cls.make_key is BaseCache.make_key
            and cls.validate_key is _RedisEXBase.validate_key
        )
        # The store keeps the keys of this prefix, if keys are Django's (else every key).
        prefix = f"{self.key_prefix}:" if self._default_keys else None
        options = params.get("OPTIONS") or _NO_OPTIONS
        tracked = prefix if options.get("client_cache") else None
        self._topology = _topology_for(self._servers, options, tracked)
        self._config = self._topology.config
        self._codec = self._config.codec
        self._store = _store_for(self._topology, prefix)
        self._tags: _Tags | None = None
        if self._config.tags:
            script = self._config.client_cache is None and self._config.topology is not _Cluster
            self._tags = _Tags(self.key_prefix, script)
        self._stats = _stats_for(self._topology, self.key_prefix, self.version)
        # django-redis reads REVERSE_KEY_FUNCTION beside KEY_FUNCTION, not in OPTIONS.
        self._reverse_key_function = _reverse_key_function(params.get("REVERSE_KEY_FUNCTION"))

    def __repr__(self) -> str:
        servers = ", ".join(_redact(s) for s in self._servers)
        return f"<{type(self).__name__} {servers}>"

    @cached_property
    def _sync_driver(self) -> _SyncShell:
        features = _features_for(self._topology, self._store, self._stats, "")
        return _SyncShell(self._topology, features)

    @cached_property
    def _async_driver(self) -> _AsyncShell:
        features = _features_for(self._topology, self._store, self._stats, "a")
        return _AsyncShell(self._topology, features)

    def stats(self) -> dict[str, dict[str, Any]]:
        """This cache's counts in this process, per method (``get`` counts ``aget`` too):
        ``calls``; ``hits`` and ``misses`` (keys found or not, by get, get_many, get_or_set and
        has_key); ``errors``; ``ignored``. A circuit breaker's state: ``"circuit_breaker"``.
        The pools, multiplexed lines and tracking connection of this configuration in this
        process, as they are now: ``"pools"`` (``_pools_report``)."""
        report: dict[str, dict[str, Any]] = dict(self._stats.report())
        breakers = _breakers_for(self._topology)
        if breakers is not None:
            report["circuit_breaker"] = breakers.report()
        report["pools"] = _pools_report(self._topology, self._store)
        return report

    # Health -----------------------------------------------------------------

    def ping(self, replicas: bool = False) -> bool:
        """PING the server that takes writes (on Cluster, every primary) and, with
        ``replicas=True``, each replica: True, or redis-py's error raised. A health check:
        ``ignore_exceptions`` and an open circuit breaker do not apply."""
        shell, topology = self._sync_driver, self._topology
        if isinstance(topology, _Cluster):
            for again in (True, False):  # a node that fails: the map read again, once
                try:
                    if not topology.slots.owner or topology.slots.stale:
                        _pong(_sync_routed(topology, [_PING]))  # (reads the map)
                    for node in topology.slots.primaries:
                        _pong(_sync_call(topology.node_client(node), [_PING]))
                    break
                except _UNAVAILABLE:
                    topology.slots.stale = True  # a failover may have moved its slots
                    if not again:
                        raise
                    time.sleep(_REFRESH_EVERY)  # (the map is read at most this often)
        else:
            _pong(shell._perform((0, [_PING])))
        if replicas:
            for index in range(1, topology.readers + 1 if type(topology) is _Servers else 1):
                _pong(shell._perform((index, [_PING])))
            for host, port in _replica_addresses(topology):
                with redis.Redis(host=host, port=port, **_ping_options(topology)) as client:
                    _pong([client.execute_command("PING")])
        return True

    async def aping(self, replicas: bool = False) -> bool:
        """``ping()`` on the asyncio path."""
        shell, topology = self._async_driver, self._topology
        if isinstance(topology, _Cluster):
            for again in (True, False):
                try:
                    if not topology.slots.owner or topology.slots.stale:
                        _pong(await _async_routed(topology, [_PING]))
                    for node in topology.slots.primaries:
                        _pong(await _async_node_call(topology, node, [_PING]))
                    break
                except _UNAVAILABLE:
                    topology.slots.stale = True
                    if not again:
                        raise
                    await asyncio.sleep(_REFRESH_EVERY)
        else:
            _pong(await shell._perform((0, [_PING])))
        if replicas:
            for index in range(1, topology.readers + 1 if type(topology) is _Servers else 1):
                _pong(await shell._perform((index, [_PING])))
            for host, port in await _areplica_addresses(topology):
                client = redis.asyncio.Redis(host=host, port=port, **_ping_options(topology))
                try:
                    _pong([await cast(Any, client).execute_command("PING")])
                finally:
                    await client.aclose()
        return True

    @property
    def _cache(self) -> _SyncShell | _AsyncShell:
        """Django's client object: sync on RedisEXCache, asyncio on AsyncRedisEXCache."""
        return self._async_driver if self._client_kind == "async" else self._sync_driver

    def client_cache_info(self) -> dict[str, Any]:
        """The client-side cache (OPTIONS ``client_cache``) of this cache's configuration in
        this process: whether it serves (``enabled``, ``connected``), its size, and counts."""
        if self._store is not None:
            return self._store.info()
        info = dict.fromkeys(("entries", "bytes", "hits", "misses", "invalidations", "flushes"), 0)
        return {"enabled": False, "connected": False, **info}

    # Raw clients and locks --------------------------------------------------

    def get_client(self, key: Any = None, *, write: bool = True) -> redis.Redis:
        """A ``redis.Redis`` on the shared pool (the first server unless ``write=False``).
        With a client-side store, on pools of their own: its connections do not report the
        changes they make themselves, and those a raw client makes must be seen."""
        if self._store is not None:
            untracked = self._topology.untracked
            return untracked.sync_client(untracked.index_for(write))
        return self._sync_driver.get_client(key, write=write)

    @property
    def client(self) -> _DjangoRedisClient:
        """django-redis's ``cache.client``: its ``get_client(write=True)`` is ``get_client``;
        its other methods, the cache's."""
        return _DjangoRedisClient(self)

    def get_async_client(self, key: Any = None, *, write: bool = True) -> redis.asyncio.Redis:
        """A ``redis.asyncio.Redis`` on the running loop's shared pool (as ``get_client``)."""
        if self._store is not None:
            untracked = self._topology.untracked
            return untracked.async_client(untracked.index_for(write))
        return self._async_driver.get_client(key, write=write)

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

    def alock(self, key: Any, version: int | None = None, **lock_arguments: Any) -> Any:
        """The asyncio ``Lock`` of the running loop, with ``lock()``'s other arguments:
        ``async with cache.alock("report"): ...``."""
        return self.get_async_client().lock(self._key(key, version), **lock_arguments)

    # Keys and timeouts ------------------------------------------------------

    def get_backend_timeout(self, timeout: float | None = DEFAULT_TIMEOUT) -> int | None:
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
        """Whether keys are Django's defaults, so ``_keys`` may make them without the calls.
        Read on every call: tests (Django's own among them) swap ``key_func`` on the fly."""
        return self.key_func is default_key_func and self._default_key_methods

    def _key(self, key: Any, version: int | None) -> str:
        """``make_and_validate_key``, made here for Django's default keys (three calls fewer)."""
        if self.key_func is not default_key_func or not self._default_key_methods:
            return self.make_and_validate_key(key, version=version)
        redis_key = f"{self.key_prefix}:{self.version if version is None else version}:{key}"
        if len(redis_key) > 250 or " " in redis_key or not redis_key.isascii():
            self.validate_key(redis_key)  # warns as Django's does
        elif not redis_key.isprintable():
            self.validate_key(redis_key)
        return redis_key

    def _keys(self, keys: Iterable[Any], version: int | None) -> list[str]:
        """``make_and_validate_key`` of each key, in order, validated in one pass: for 100
        keys, 11 µs instead of 32 µs a key at a time (a get_many of 100 takes about 300 µs)."""
        if not self._default_keys:
            return [self._key(key, version=version) for key in keys]
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

    def _pattern(self, pattern: str, version: int | str | None) -> str:
        """A SCAN pattern for user keys matching ``pattern``, the prefix taken literally."""
        prefix = _GLOB_SPECIAL.sub(r"\\\1", self.key_prefix)
        return str(self.key_func(pattern, prefix, self.version if version is None else version))

    def _user_key_of(self, version: int | None) -> Callable[[Any], str]:
        """How to turn a Redis key found by SCAN back into the user's key."""
        reverse = self._config.reverse_key_function or self._reverse_key_function
        if reverse is not None:
            return lambda redis_key: reverse(_text(redis_key))
        if self.key_func is default_key_func:
            head = len(f"{self.key_prefix}:{self.version if version is None else version}:")
            return lambda redis_key: _text(redis_key)[head:]
        return _text

    # The API: each method's plan, then the method and its async twin made from it ----------

    def _tag_keys(self, tags: Iterable[str]) -> list[str] | None:
        """The Redis keys of ``tags`` (None if there are none), or a clear error."""
        if isinstance(tags, (str, bytes)):
            raise TypeError(f"tags= takes an iterable of str, not the string {tags!r}.")
        names = list(tags)
        if not names:
            return None
        if self._tags is None:
            raise ImproperlyConfigured(
                "tags= needs OPTIONS 'tags': True in this cache's CACHES entry (reads then "
                "check tags; see the README's Tags section)."
            )
        return self._tags.keys(names)

    def _plan_add(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        *,
        tags: Iterable[str] = (),
    ) -> Plan[bool]:
        """Django's add; ``tags=``: see ``invalidate_tags``."""
        timeout = self.get_backend_timeout(timeout)
        tag_keys = self._tag_keys(tags)
        redis_key = self._key(key, version)
        operation = _op_add(self._codec, redis_key, value, timeout, self._tags, tag_keys)
        return Plan("add", operation, _false)

    add, aadd = _twins(_plan_add)

    def _plan_get(self, key: Any, default: Any = None, version: int | None = None) -> Plan[Any]:
        redis_key = self._key(key, version)
        operation = _op_get(self._codec, redis_key, default, self._stats.rows["get"], self._tags)
        return Plan("get", operation, lambda: default)

    def _local_get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        found = cast(_AnyStore, self._store).lookup(self._key(key, version))
        if found is _MISSING:
            return _MISSING
        row = self._stats.rows["get"]  # served: counted here, the hot path's one count
        row[_CALLS] += 1
        if found is _ABSENT:
            row[_MISSES] += 1
            return default
        row[_HITS] += 1
        return found

    get, aget = _twins(_plan_get, _local_get)

    def _plan_set(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        nx: bool = False,
        xx: bool = False,
        *,
        tags: Iterable[str] = (),
    ) -> Plan[Any]:
        """Django's set; with ``nx=True`` (only if missing) or ``xx=True`` (only if present),
        returns whether the value was written. (Typed Any: Django's returns None.) ``tags=``:
        see ``invalidate_tags``."""
        if nx and xx:
            raise ValueError("set() takes nx=True or xx=True, not both.")
        timeout = self.get_backend_timeout(timeout)
        tag_keys, redis_key = self._tag_keys(tags), self._key(key, version)
        operation = _op_set(self._codec, redis_key, value, timeout, nx, xx, self._tags, tag_keys)
        return Plan("set", operation, _false if nx or xx else _none)

    set, aset = _twins(_plan_set)

    def _plan_touch(
        self, key: Any, timeout: float | None = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Plan[bool]:
        timeout = self.get_backend_timeout(timeout)
        redis_key = self._key(key, version)
        command = ("PERSIST", redis_key) if timeout is None else ("EXPIRE", redis_key, timeout)
        if timeout is not None and timeout <= 0:  # gone at once: its stale copy too
            return Plan("touch", _op_bool_dropping_copy(command), _false)
        return Plan("touch", _op_bool(*command), _false)

    touch, atouch = _twins(_plan_touch)

    def _plan_delete(self, key: Any, version: int | None = None) -> Plan[bool]:
        """Django's delete; the key's stale copy (``get_or_set``) goes too."""
        return Plan("delete", _op_bool_dropping_copy(("DEL", self._key(key, version))), _false)

    delete, adelete = _twins(_plan_delete)

    def _plan_get_many(
        self, keys: Iterable[Any], version: int | None = None
    ) -> Plan[dict[Any, Any]]:
        keys = list(keys)
        key_map = dict(zip(self._keys(keys, version), keys, strict=True))
        tally = self._stats.rows["get_many"]
        return Plan("get_many", _op_get_many(self._codec, key_map, tally, self._tags), dict)

    def _local_get_many(self, keys: Iterable[Any], version: int | None = None) -> Any:
        if not isinstance(keys, (list, tuple)):  # an iterator: read once, by the plan
            return _MISSING
        values = cast(_AnyStore, self._store).lookup_many(self._keys(keys, version))
        if values is None:
            return _MISSING
        found = {
            key: value for key, value in zip(keys, values, strict=True) if value is not _ABSENT
        }
        self._stats.served("get_many", len(found), len(set(keys)) - len(found))
        return found

    get_many, aget_many = _twins(_plan_get_many, _local_get_many)

    def _plan_get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        *,
        tags: Iterable[str] = (),
        stale_while_revalidate: float = 0,
        stale_if_error: float = 0,
    ) -> Plan[Any]:
        """Django's get_or_set, with stampede protection; ``tags=``: the computed value's (see
        ``invalidate_tags``). For ``stale_while_revalidate`` seconds after the value expired,
        it is returned at once while one caller computes the next (in the background on the
        asyncio path); for ``stale_if_error`` seconds, instead of the default's exception."""
        timeout = self.get_backend_timeout(timeout)
        windows = (
            _window("stale_while_revalidate", stale_while_revalidate),
            _window("stale_if_error", stale_if_error),
        )
        lock_timeout = self._config.stampede_lock_timeout
        if lock_timeout is None and any(windows):  # one caller recomputes: it takes the lock
            lock_timeout = _DEFAULT_LOCK_TIMEOUT
        tag_keys, redis_key = self._tag_keys(tags), self._key(key, version)
        undo: list[tuple[Any, ...]] = []
        computed: list[Any] = []  # with Redis unavailable, a value computed is not lost
        tally = self._stats.rows["get_or_set"]
        operation = _op_get_or_set(
            self._codec,
            redis_key,
            default,
            timeout,
            lock_timeout,
            undo,
            computed,
            tally,
            self._tags,
            tag_keys,
            windows,
        )

        def fallback() -> Any:
            if computed:
                return computed[0]
            return default() if callable(default) else default

        # On the first server: a replica that lags would show neither the value another
        # caller stored nor its lock, and stampede protection would weaken.
        return _OnPrimary("get_or_set", operation, fallback, undo)

    def _local_get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        *,
        tags: Iterable[str] = (),
        stale_while_revalidate: float = 0,
        stale_if_error: float = 0,
    ) -> Any:
        found = cast(_AnyStore, self._store).lookup(self._key(key, version))
        if found is _MISSING or found is _ABSENT:  # absent: computed, with Redis
            return _MISSING
        self._stats.served("get_or_set", 1, 0)
        return found

    get_or_set, aget_or_set = _twins(_plan_get_or_set, _local_get_or_set)

    def _plan_has_key(self, key: Any, version: int | None = None) -> Plan[bool]:
        redis_key = self._key(key, version)
        tally = self._stats.rows["has_key"]
        return Plan("has_key", _op_exists(redis_key, tally, self._tags), _false)

    def _local_has_key(self, key: Any, version: int | None = None) -> Any:
        held = cast(_AnyStore, self._store).holds(self._key(key, version))
        if held is None:
            return _MISSING
        self._stats.served("has_key", held, not held)
        return held

    has_key, ahas_key = _twins(_plan_has_key, _local_has_key)

    def _plan_incr(
        self, key: Any, delta: int = 1, version: int | None = None, ignore_key_check: bool = False
    ) -> Plan[int]:
        """Django's incr; ``ignore_key_check=True`` creates a missing key (from 0) instead."""
        return self._counter("incr", key, delta, version, ignore_key_check)

    incr, aincr = _twins(_plan_incr)

    def _plan_decr(
        self, key: Any, delta: int = 1, version: int | None = None, ignore_key_check: bool = False
    ) -> Plan[int]:
        """Django's decr; ``ignore_key_check=True`` creates a missing key (from 0) instead."""
        return self._counter("decr", key, -delta, version, ignore_key_check)

    decr, adecr = _twins(_plan_decr)

    def _counter(
        self, method: str, key: Any, delta: int, version: int | None, create: bool
    ) -> Plan[int]:
        redis_key = self._key(key, version)
        fallback = functools.partial(_key_not_found, redis_key)
        return Plan(method, _op_incr(redis_key, delta, create, self._tags), fallback)

    def _plan_set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        *,
        tags: Iterable[str] = (),
    ) -> Plan[list[Any]]:
        """Django's set_many; ``tags=``: every value's (see ``invalidate_tags``)."""
        tag_keys = self._tag_keys(tags)
        redis_data = dict(zip(self._keys(data, version), data.values(), strict=True))
        timeout = self.get_backend_timeout(timeout)
        operation = _op_set_many(self._codec, redis_data, timeout, tag_keys)
        return Plan("set_many", operation, lambda: list(data))  # unavailable: every key failed

    set_many, aset_many = _twins(_plan_set_many)

    def _plan_invalidate_tags(self, *tags: str) -> Plan[None]:
        """Every entry written with any of ``tags`` before this call reads as absent after
        it, in every process; entries written after it with them are valid. One DEL of the
        tags' keys: the cost grows with the number of tags, not of entries. Its failure is
        raised, ignore_exceptions or not (OPTIONS ``tags``)."""
        tag_keys = self._tag_keys(tags) or []
        return _Unignorable("invalidate_tags", _op_delete_many(tag_keys), _none)

    invalidate_tags, ainvalidate_tags = _twins(_plan_invalidate_tags)

    def _plan_delete_many(self, keys: Iterable[Any], version: int | None = None) -> Plan[None]:
        redis_keys = self._keys(keys, version)
        redis_keys += [key + _STALE_SUFFIX for key in redis_keys]  # their stale copies too
        return Plan("delete_many", _op_delete_many(redis_keys), _none)

    delete_many, adelete_many = _twins(_plan_delete_many)

    def _plan_incr_version(self, key: Any, delta: int = 1, version: int | None = None) -> Plan[int]:
        """Django's incr_version, keeping the value's remaining time to live."""
        return self._move("incr_version", key, delta, version)

    incr_version, aincr_version = _twins(_plan_incr_version)

    def _plan_decr_version(self, key: Any, delta: int = 1, version: int | None = None) -> Plan[int]:
        """Django's decr_version, keeping the value's remaining time to live."""
        return self._move("decr_version", key, -delta, version)

    decr_version, adecr_version = _twins(_plan_decr_version)

    def _move(self, method: str, key: Any, delta: int, version: int | None) -> Plan[int]:
        old = self.version if version is None else version
        old_key, new_key = self._key(key, old), self._key(key, old + delta)
        atomic = self._topology.atomic_move
        move: Operation[Any] = _op_move(self._codec, old_key, new_key, key, atomic)
        if self._tags is not None:
            move = _op_move_present(self._tags, old_key, key, move)
        operation = _op_then(move, old + delta)
        return Plan(method, operation, functools.partial(_key_not_found, key))

    def _plan_clear(self) -> Plan[bool]:
        """FLUSHDB, as Django's; with OPTIONS ``clear_by_prefix``, only this cache's keys.
        Returns True, as Django's own Redis backend does (django-stubs types it None)."""
        if not self._config.clear_by_prefix:
            return Plan("clear", _op_bool("FLUSHDB"), _false)
        pattern = self._pattern("*", "*")  # every version
        operation = _op_then(_op_delete_pattern(pattern, self._config.scan_count), True)
        return Plan("clear", operation, _false)

    clear, aclear = _twins(_plan_clear)  # type: ignore[assignment]

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: the pools are shared by every cache object and outlive requests."""

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing to do, as ``close()``."""

    # Expiry (django-redis's names and return values) ------------------------

    def _plan_ttl(self, key: Any, version: int | None = None) -> Plan[int | None]:
        """Seconds left: None if the key never expires, 0 if it does not exist."""
        return Plan("ttl", _op_ttl("TTL", self._key(key, version)), _zero)

    ttl, attl = _twins(_plan_ttl)

    def _plan_pttl(self, key: Any, version: int | None = None) -> Plan[int | None]:
        """Milliseconds left: None if the key never expires, 0 if it does not exist."""
        return Plan("pttl", _op_ttl("PTTL", self._key(key, version)), _zero)

    pttl, apttl = _twins(_plan_pttl)

    def _plan_expire(self, key: Any, timeout: Any, version: int | None = None) -> Plan[bool]:
        """Expire in ``timeout`` seconds (a number or a timedelta; ``DEFAULT_TIMEOUT``: the
        cache's TIMEOUT; None: never); False if no such key."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return self._persisted("expire", key, version)
        return self._expiry("expire", key, _seconds(timeout), version)

    expire, aexpire = _twins(_plan_expire)

    def _plan_expire_at(self, key: Any, when: Any, version: int | None = None) -> Plan[bool]:
        """Expire at ``when``: a datetime, or Unix time in seconds (None: never)."""
        if when is None:
            return self._persisted("expire_at", key, version)
        return self._expiry("expire_at", key, _timestamp(when), version)

    expire_at, aexpire_at = _twins(_plan_expire_at)

    def _plan_pexpire(self, key: Any, timeout: Any, version: int | None = None) -> Plan[bool]:
        """Expire in ``timeout`` milliseconds (a number or a timedelta; ``DEFAULT_TIMEOUT``:
        the cache's TIMEOUT, in seconds; None: never)."""
        if timeout is DEFAULT_TIMEOUT:
            if self.default_timeout is None:
                return self._persisted("pexpire", key, version)
            timeout = datetime.timedelta(seconds=self.default_timeout)
        if timeout is None:
            return self._persisted("pexpire", key, version)
        return self._expiry("pexpire", key, _seconds(timeout, 0.001), version)

    pexpire, apexpire = _twins(_plan_pexpire)

    def _plan_pexpire_at(self, key: Any, when: Any, version: int | None = None) -> Plan[bool]:
        """Expire at ``when``: a datetime, or Unix time in milliseconds (None: never)."""
        if when is None:
            return self._persisted("pexpire_at", key, version)
        return self._expiry("pexpire_at", key, _timestamp(when, 0.001), version)

    pexpire_at, apexpire_at = _twins(_plan_pexpire_at)

    def _plan_persist(self, key: Any, version: int | None = None) -> Plan[bool]:
        """Remove the key's expiry; False if it has none or does not exist."""
        return self._expiry("persist", key, None, version)

    persist, apersist = _twins(_plan_persist)

    def _persisted(self, method: str, key: Any, version: int | None) -> Plan[bool]:
        """An expiry of None: the key kept for ever; False if there is no such key."""
        redis_key = self._key(key, version)
        commands = [("PERSIST", redis_key), ("EXISTS", redis_key)]
        return Plan(method, _op_round_trip(lambda replies: bool(replies[1]), commands), _false)

    def _expiry(self, method: str, key: Any, amount: int | None, version: int | None) -> Plan[bool]:
        """EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT or (without an amount) PERSIST."""
        command = (method.replace("_", "").upper(), self._key(key, version))
        if amount is None:
            operation = _op_bool(*command)
        elif amount <= 0 and method in ("expire", "pexpire"):  # gone at once: its copy too
            operation = _op_bool_dropping_copy((*command, amount))
        else:
            operation = _op_bool(*command, amount)
        return Plan(method, operation, _false)

    # Keys by pattern (SCAN, never KEYS) --------------------------------------

    def _plan_iter_keys(
        self, search: str, itersize: int | None = None, version: int | None = None
    ) -> _Pages:
        """The user keys matching the glob ``search``, lazily, ``itersize`` per SCAN."""
        count = itersize or self._config.scan_count
        pattern, convert = self._pattern(search, version), self._user_key_of(version)
        return lambda cursor: Plan("iter_keys", _op_scan(pattern, count, convert, cursor), _no_page)

    iter_keys, aiter_keys = _iteration_twins(_plan_iter_keys)

    def keys(self, search: str, version: int | None = None) -> list[str]:
        """The user keys matching the glob ``search``, all at once."""
        return list(self.iter_keys(search, version=version))

    async def akeys(self, search: str, version: int | None = None) -> list[str]:
        return [key async for key in self.aiter_keys(search, version=version)]

    def _plan_delete_pattern(
        self, pattern: str, version: int | None = None, itersize: int | None = None
    ) -> Plan[int]:
        """Delete the keys matching the glob ``pattern``; returns how many were deleted."""
        pattern, count = self._pattern(pattern, version), itersize or self._config.scan_count
        return Plan("delete_pattern", _op_delete_pattern(pattern, count), _zero)

    delete_pattern, adelete_pattern = _twins(_plan_delete_pattern)


# ---------------------------------------------------------------------------
# The data-structure methods: sets, hashes and sorted sets, by django-redis 7's names
# ---------------------------------------------------------------------------


class _DataStructures(_RedisEXBase):
    """django-redis 7's set, hash and sorted-set methods and results, each with its ``a`` twin.
    Members and hash values are stored as cache values are (serialized, maybe compressed; ints
    raw); hash fields, scores and counts as they are. Keys are cache keys."""

    def _one(
        self,
        method: str,
        convert: Callable[[Any], _T],
        fallback: Callable[[], _T],
        key: Any,
        version: int | None,
        *arguments: Any,
    ) -> Plan[_T]:
        """A plan of one command on one key: ``method`` upper-cased, the key, ``arguments``."""
        redis_key = self._key(key, version)
        convert = self._decoding(convert, redis_key)
        return Plan(method, _op_apply(convert, method.upper(), redis_key, *arguments), fallback)

    def _decoding(self, convert: Callable[[Any], _T], key: str) -> Callable[[Any], _T]:
        """``convert``, logging ``key`` when a member it decodes has no valid signature."""
        codec = self._codec
        if not codec.signed:
            return convert

        def checked(reply: Any) -> _T:
            forged = codec.forged
            result = convert(reply)
            if codec.forged != forged:
                _forged(key)
            return result

        return checked

    def _together(self, method: str, keys: list[Any], redis_keys: list[str]) -> list[str]:
        """``redis_keys``, the keys of one command; on Cluster, they must share a slot."""
        if isinstance(self._topology, _Cluster):
            slots = [redis.crc.key_slot(key.encode()) for key in redis_keys]
            for user_key, slot in zip(keys, slots, strict=True):
                if slot != slots[0]:
                    raise redis.exceptions.RedisClusterException(  # type: ignore[no-untyped-call, unused-ignore]
                        f"{method}(): the keys {keys[0]!r} and {user_key!r} lie in different "
                        "Redis Cluster slots, and a command on several keys needs them in one. "
                        "Give them the same hash tag: '{user:1}:cart', '{user:1}:saved'."
                    )
        return redis_keys

    def _at(self, key: Any, version: int | None, kind: bytes = b"s") -> _Codec:
        """The codec for members of ``key`` (of a set; b"z" a sorted set)."""
        codec = self._codec
        return codec.at(self._key(key, version), kind) if codec.signed else codec

    def _fields_at(self, key: Any, version: int | None) -> Callable[[Any], _Codec]:
        """The codec for the value of each field of the hash ``key``."""
        codec = self._codec
        if not codec.signed:
            return lambda field: codec
        redis_key = self._key(key, version)
        encoding = self._config.sync_options.get("encoding", "utf-8")
        return lambda field: codec.at(redis_key, b"h" + _field_bytes(field, encoding))

    def _dumped(
        self, key: Any, version: int | None, values: Iterable[Any], kind: bytes = b"s"
    ) -> list[Any]:
        return list(map(self._at(key, version, kind).dumps, values))

    def _plan_sadd(self, key: Any, *values: Any, version: int | None = None) -> Plan[int]:
        """Add members to a set; how many were not there."""
        return self._one("sadd", int, _zero, key, version, *self._dumped(key, version, values))

    sadd, asadd = _twins(_plan_sadd)

    def _plan_scard(self, key: Any, version: int | None = None) -> Plan[int]:
        """How many members a set has."""
        return self._one("scard", int, _zero, key, version)

    scard, ascard = _twins(_plan_scard)

    def _set_algebra(
        self, method: str, keys: tuple[Any, ...], version: int | None
    ) -> Plan[builtins.set[Any]]:
        redis_keys = self._together(method, list(keys), self._keys(keys, version))
        if isinstance(self._codec, _SignedCodec):  # each set's members signed for their set
            return Plan(method, _op_signed_algebra(self._codec, method, redis_keys), set)
        convert = functools.partial(_member_set, self._codec)
        return Plan(method, _op_apply(convert, method.upper(), *redis_keys), set)

    def _plan_sdiff(self, *keys: Any, version: int | None = None) -> Plan[builtins.set[Any]]:
        """The members of the first set that are in none of the others."""
        return self._set_algebra("sdiff", keys, version)

    sdiff, asdiff = _twins(_plan_sdiff)

    def _plan_sinter(self, *keys: Any, version: int | None = None) -> Plan[builtins.set[Any]]:
        """The members in every one of the sets."""
        return self._set_algebra("sinter", keys, version)

    sinter, asinter = _twins(_plan_sinter)

    def _plan_sunion(self, *keys: Any, version: int | None = None) -> Plan[builtins.set[Any]]:
        """The members in any of the sets."""
        return self._set_algebra("sunion", keys, version)

    sunion, asunion = _twins(_plan_sunion)

    def _stored(
        self,
        method: str,
        dest: Any,
        keys: tuple[Any, ...],
        version_dest: int | None,
        version_keys: int | None,
    ) -> Plan[int]:
        redis_keys = [self._key(dest, version_dest), *self._keys(keys, version_keys)]
        redis_keys = self._together(method, [dest, *keys], redis_keys)
        if isinstance(self._codec, _SignedCodec):  # members signed again for ``dest``
            operation = _op_signed_store(self._codec, method, redis_keys)
            return Plan(method, operation, _zero)
        return Plan(method, _op_apply(int, method.upper(), *redis_keys), _zero)

    def _plan_sdiffstore(
        self,
        dest: Any,
        *keys: Any,
        version_dest: int | None = None,
        version_keys: int | None = None,
    ) -> Plan[int]:
        """Store ``sdiff(*keys)`` in the set ``dest``; its size."""
        return self._stored("sdiffstore", dest, keys, version_dest, version_keys)

    sdiffstore, asdiffstore = _twins(_plan_sdiffstore)

    def _plan_sinterstore(self, dest: Any, *keys: Any, version: int | None = None) -> Plan[int]:
        """Store ``sinter(*keys)`` in the set ``dest``; its size."""
        return self._stored("sinterstore", dest, keys, version, version)

    sinterstore, asinterstore = _twins(_plan_sinterstore)

    def _plan_sunionstore(
        self, destination: Any, *keys: Any, version: int | None = None
    ) -> Plan[int]:
        """Store ``sunion(*keys)`` in the set ``destination``; its size."""
        return self._stored("sunionstore", destination, keys, version, version)

    sunionstore, asunionstore = _twins(_plan_sunionstore)

    def _plan_sismember(self, key: Any, member: Any, version: int | None = None) -> Plan[bool]:
        """Whether ``member`` is in the set."""
        member = self._at(key, version).dumps(member)
        return self._one("sismember", bool, _false, key, version, member)

    sismember, asismember = _twins(_plan_sismember)

    def _plan_smismember(
        self, key: Any, *members: Any, version: int | None = None
    ) -> Plan[list[bool]]:
        """Whether each of ``members`` is in the set."""
        fallback = lambda: [False] * len(members)  # noqa: E731
        dumped = self._dumped(key, version, members)
        return self._one("smismember", _bools, fallback, key, version, *dumped)

    smismember, asmismember = _twins(_plan_smismember)

    def _plan_smembers(self, key: Any, version: int | None = None) -> Plan[builtins.set[Any]]:
        """The members of the set."""
        convert = functools.partial(_member_set, self._at(key, version))
        return self._one("smembers", convert, set, key, version)

    smembers, asmembers = _twins(_plan_smembers)

    def _plan_smove(
        self, source: Any, destination: Any, member: Any, version: int | None = None
    ) -> Plan[bool]:
        """Move ``member`` from one set to another; whether it was in ``source``."""
        keys = [source, destination]
        redis_keys = self._together("smove", keys, self._keys(keys, version))
        codec = self._codec
        if codec.signed:  # out signed for one set, in for the other: in one script
            out, into = (codec.at(key, b"s").dumps(member) for key in redis_keys)
            return Plan("smove", _op_apply(bool, *_SMOVE_SIGNED(redis_keys, [out, into])), _false)
        operation = _op_apply(bool, "SMOVE", *redis_keys, codec.dumps(member))
        return Plan("smove", operation, _false)

    smove, asmove = _twins(_plan_smove)

    def _plan_spop(
        self, key: Any, count: int | None = None, version: int | None = None
    ) -> Plan[Any]:
        """Remove and return a random member (None if the set is empty), or with ``count``
        a set of up to ``count`` of them."""
        codec = self._at(key, version)
        if count is None:
            convert: Callable[[Any], Any] = functools.partial(_optional_member, codec)
            return self._one("spop", convert, _none, key, version)
        convert = functools.partial(_member_set, codec)
        return self._one("spop", convert, set, key, version, count)

    spop, aspop = _twins(_plan_spop)

    def _plan_srandmember(
        self, key: Any, count: int | None = None, version: int | None = None
    ) -> Plan[Any]:
        """A random member (None if the set is empty), or with ``count`` a list of them
        (distinct if ``count`` is positive, maybe repeated if negative)."""
        codec = self._at(key, version)
        if count is None:
            convert: Callable[[Any], Any] = functools.partial(_optional_member, codec)
            return self._one("srandmember", convert, _none, key, version)
        convert = functools.partial(_members, codec)
        return self._one("srandmember", convert, list, key, version, count)

    srandmember, asrandmember = _twins(_plan_srandmember)

    def _plan_srem(self, key: Any, *members: Any, version: int | None = None) -> Plan[int]:
        """Remove members from the set; how many were there."""
        return self._one("srem", int, _zero, key, version, *self._dumped(key, version, members))

    srem, asrem = _twins(_plan_srem)

    def _plan_sscan(
        self, key: Any, match: str | None = None, count: int | None = 10, version: int | None = None
    ) -> Plan[builtins.set[Any]]:
        """The members of the set (matching the glob ``match``, if given: a str member
        matches as in Redis; other members never do), ``count`` per SSCAN round trip."""
        page = self._sscan(key, match, count, version)
        return Plan("sscan", _op_then_set(_op_every_page(page)), set)

    sscan, asscan = _twins(_plan_sscan)

    def _plan_sscan_iter(
        self, key: Any, match: str | None = None, count: int | None = 10, version: int | None = None
    ) -> _Pages:
        """``sscan`` as a lazy iterator: one SSCAN round trip per ``count`` members."""
        page = self._sscan(key, match, count, version)
        return lambda cursor: Plan("sscan_iter", page(cursor), _no_page)

    sscan_iter, asscan_iter = _iteration_twins(_plan_sscan_iter)

    def _sscan(
        self, key: Any, match: str | None, count: int | None, version: int | None
    ) -> Callable[[int], Operation[_Page]]:
        redis_key, count = self._key(key, version), count or self._config.scan_count
        codec = self._codec.at(redis_key, b"s")
        return functools.partial(_op_sscan, codec, redis_key, count, match)

    def _plan_hset(
        self,
        key: Any,
        field: Any = None,
        value: Any = None,
        mapping: Mapping[Any, Any] | None = None,
        version: int | None = None,
    ) -> Plan[int]:
        """Set ``field`` to ``value`` in the hash, and each field of ``mapping``; how many
        fields were new. Fields are str (or bytes, int, float), stored as they are."""
        at = self._fields_at(key, version)
        items = [] if field is None else [field, at(field).dumps(value)]
        for each, item in (mapping or {}).items():
            items += (each, at(each).dumps(item))
        if not items:
            raise ValueError("hset() takes a field and its value, or a mapping, or both.")
        return self._one("hset", int, _zero, key, version, *items)

    hset, ahset = _twins(_plan_hset)

    def _plan_hdel(self, key: Any, field: Any, version: int | None = None) -> Plan[int]:
        """Remove ``field`` from the hash; 1 if it was there, else 0."""
        return self._one("hdel", int, _zero, key, version, field)

    hdel, ahdel = _twins(_plan_hdel)

    def _plan_hlen(self, key: Any, version: int | None = None) -> Plan[int]:
        """How many fields the hash has."""
        return self._one("hlen", int, _zero, key, version)

    hlen, ahlen = _twins(_plan_hlen)

    def _plan_hkeys(self, key: Any, version: int | None = None) -> Plan[list[str]]:
        """The fields of the hash, as str."""
        return self._one("hkeys", _fields, list, key, version)

    hkeys, ahkeys = _twins(_plan_hkeys)

    def _plan_hexists(self, key: Any, field: Any, version: int | None = None) -> Plan[bool]:
        """Whether the hash has ``field``."""
        return self._one("hexists", bool, _false, key, version, field)

    hexists, ahexists = _twins(_plan_hexists)

    def _plan_hget(self, key: Any, field: Any, version: int | None = None) -> Plan[Any]:
        """The value of ``field`` in the hash; None if there is none."""
        convert = functools.partial(_optional_member, self._fields_at(key, version)(field))
        return self._one("hget", convert, _none, key, version, field)

    hget, ahget = _twins(_plan_hget)

    def _plan_hgetall(self, key: Any, version: int | None = None) -> Plan[dict[str, Any]]:
        """The whole hash: {field (str): value}."""
        convert = functools.partial(_hash, self._codec, self._fields_at(key, version))
        return self._one("hgetall", convert, dict, key, version)

    hgetall, ahgetall = _twins(_plan_hgetall)

    def _plan_hmget(
        self, key: Any, fields: Any, *more_fields: Any, version: int | None = None
    ) -> Plan[list[Any]]:
        """The values of ``fields`` (one field, or an iterable of them, then ``more_fields``)
        in order, None for each missing one: redis-py's ``hmget``."""
        wanted = [fields] if isinstance(fields, (str, bytes)) else list(fields)
        wanted += more_fields
        at = self._fields_at(key, version)
        convert = functools.partial(_optional_members, [at(field) for field in wanted])
        return self._one("hmget", convert, lambda: [None] * len(wanted), key, version, *wanted)

    hmget, ahmget = _twins(_plan_hmget)

    def _plan_hincrby(
        self, key: Any, field: Any, amount: int = 1, version: int | None = None
    ) -> Plan[int]:
        """Add ``amount`` to the integer in ``field`` (0 if missing); the new value."""
        fallback = lambda: amount  # noqa: E731  (Redis unavailable: as on a missing field)
        return self._one("hincrby", int, fallback, key, version, field, amount)

    hincrby, ahincrby = _twins(_plan_hincrby)

    def _plan_zadd(
        self,
        key: Any,
        mapping: Mapping[Any, float],
        nx: bool = False,
        xx: bool = False,
        ch: bool = False,
        incr: bool = False,
        gt: bool = False,
        lt: bool = False,
        version: int | None = None,
    ) -> Plan[Any]:
        """Add members with their scores ({member: score}); how many were added (changed,
        with ``ch``), or with ``incr`` the member's new score (None if a flag stopped it)."""
        if nx and (xx or gt or lt):
            raise ValueError("zadd() takes nx=True without xx, gt or lt.")
        if gt and lt:
            raise ValueError("zadd() takes gt=True or lt=True, not both.")
        if incr and len(mapping) != 1:
            raise ValueError("zadd(incr=True) takes a mapping of exactly one member.")
        flags = [f for f, on in (("NX", nx), ("XX", xx), ("GT", gt), ("LT", lt), ("CH", ch)) if on]
        codec, pairs = self._zforms(key, version, mapping)
        items = [
            part for member, score in mapping.items() for part in (score, codec.zmember(member))
        ]
        if incr:
            return self._zconverged(
                "zadd", _score, _none, key, version, pairs, *flags, "INCR", *items
            )
        return self._zconverged("zadd", int, _zero, key, version, pairs, *flags, *items)

    def _zforms(
        self, key: Any, version: int | None, values: Iterable[Any]
    ) -> tuple[_Codec, list[Any]]:
        """The codec of sorted set ``key``'s members, and the (2.0 form, form) pairs of those
        of ``values`` that 2.0 stored otherwise (ints, raw)."""
        codec = self._at(key, version, b"z")
        pairs: list[Any] = []
        for value in values:
            old = codec.zlegacy(value)
            if old is not None:
                pairs += (old, codec.zmember(value))
        return codec, pairs

    def _zconverged(
        self,
        method: str,
        convert: Callable[[Any], _T],
        fallback: Callable[[], _T],
        key: Any,
        version: int | None,
        pairs: list[Any],
        *arguments: Any,
    ) -> Plan[_T]:
        """``_one``, after the members in ``pairs`` took their form (``_op_converged``)."""
        redis_key = self._key(key, version)
        command = (method.upper(), redis_key, *arguments)
        return Plan(method, _op_converged(convert, pairs, *command), fallback)

    zadd, azadd = _twins(_plan_zadd)

    def _plan_zcard(self, key: Any, version: int | None = None) -> Plan[int]:
        """How many members the sorted set has."""
        return self._one("zcard", int, _zero, key, version)

    zcard, azcard = _twins(_plan_zcard)

    def _plan_zcount(
        self, key: Any, min: float | str, max: float | str, version: int | None = None
    ) -> Plan[int]:
        """How many members score between ``min`` and ``max`` ("(1" excludes 1, "-inf")."""
        return self._one("zcount", int, _zero, key, version, min, max)

    zcount, azcount = _twins(_plan_zcount)

    def _plan_zincrby(
        self, key: Any, amount: float, value: Any, version: int | None = None
    ) -> Plan[float]:
        """Add ``amount`` to the score of member ``value`` (from 0); its new score."""
        codec, pairs = self._zforms(key, version, (value,))
        member = codec.zmember(value)  # unavailable: as if from 0
        fallback = lambda: float(amount)  # noqa: E731
        return self._zconverged("zincrby", float, fallback, key, version, pairs, amount, member)

    zincrby, azincrby = _twins(_plan_zincrby)

    def _popped_plan(
        self, method: str, key: Any, count: int | None, version: int | None
    ) -> Plan[Any]:
        convert = functools.partial(_popped, self._at(key, version, b"z"), count)
        if count is None:
            return self._one(method, convert, _none, key, version)
        return self._one(method, convert, list, key, version, count)

    def _plan_zpopmax(
        self, key: Any, count: int | None = None, version: int | None = None
    ) -> Plan[Any]:
        """Remove and return the (member, score) that scores highest, None if the set is
        empty; with ``count``, a list of up to ``count`` of them, highest first."""
        return self._popped_plan("zpopmax", key, count, version)

    zpopmax, azpopmax = _twins(_plan_zpopmax)

    def _plan_zpopmin(
        self, key: Any, count: int | None = None, version: int | None = None
    ) -> Plan[Any]:
        """``zpopmax`` for the lowest scores."""
        return self._popped_plan("zpopmin", key, count, version)

    zpopmin, azpopmin = _twins(_plan_zpopmin)

    def _ranged(
        self,
        method: str,
        key: Any,
        version: int | None,
        withscores: bool,
        score_cast_func: Callable[[float], Any],
        command: tuple[Any, ...],
        limit: tuple[int | None, int | None] = (None, None),
    ) -> Plan[list[Any]]:
        """ZRANGE and its kin: ``command`` is the name and the arguments after the key;
        ``limit``, the ``start`` and ``num`` that page through the BYSCORE ones."""
        start, num = limit
        if (start is None) != (num is None):
            raise ValueError(f"{method}() takes start and num together, or neither.")
        command += () if start is None else ("LIMIT", start, num)
        name, *arguments = (*command, "WITHSCORES") if withscores else command
        redis_key = self._key(key, version)
        codec = self._at(key, version, b"z")
        scored = functools.partial(_scored, codec, withscores, score_cast_func)
        convert = self._decoding(scored, redis_key)
        return Plan(method, _op_apply(convert, name, redis_key, *arguments), list)

    def _plan_zrange(
        self,
        key: Any,
        start: int,
        end: int,
        desc: bool = False,
        withscores: bool = False,
        score_cast_func: Callable[[float], Any] = float,
        version: int | None = None,
    ) -> Plan[list[Any]]:
        """Members by rank, from ``start`` to ``end`` inclusive (-1 is the last), lowest
        score first (highest with ``desc``); with ``withscores``, (member, score) pairs."""
        command = ("ZREVRANGE" if desc else "ZRANGE", start, end)
        return self._ranged("zrange", key, version, withscores, score_cast_func, command)

    zrange, azrange = _twins(_plan_zrange)

    def _plan_zrevrange(
        self,
        key: Any,
        start: int,
        end: int,
        withscores: bool = False,
        score_cast_func: Callable[[float], Any] = float,
        version: int | None = None,
    ) -> Plan[list[Any]]:
        """``zrange(..., desc=True)``."""
        command = ("ZREVRANGE", start, end)
        return self._ranged("zrevrange", key, version, withscores, score_cast_func, command)

    zrevrange, azrevrange = _twins(_plan_zrevrange)

    def _plan_zrangebyscore(
        self,
        key: Any,
        min: float | str,
        max: float | str,
        start: int | None = None,
        num: int | None = None,
        withscores: bool = False,
        score_cast_func: Callable[[float], Any] = float,
        version: int | None = None,
    ) -> Plan[list[Any]]:
        """Members scoring between ``min`` and ``max``, lowest first; ``start`` and ``num``
        page through them; with ``withscores``, (member, score) pairs."""
        command = ("ZRANGEBYSCORE", min, max)
        return self._ranged(
            "zrangebyscore", key, version, withscores, score_cast_func, command, (start, num)
        )

    zrangebyscore, azrangebyscore = _twins(_plan_zrangebyscore)

    def _plan_zrevrangebyscore(
        self,
        key: Any,
        max: float | str,
        min: float | str,
        start: int | None = None,
        num: int | None = None,
        withscores: bool = False,
        score_cast_func: Callable[[float], Any] = float,
        version: int | None = None,
    ) -> Plan[list[Any]]:
        """``zrangebyscore`` highest first (note: ``max`` comes before ``min``)."""
        command = ("ZREVRANGEBYSCORE", max, min)
        return self._ranged(
            "zrevrangebyscore", key, version, withscores, score_cast_func, command, (start, num)
        )

    zrevrangebyscore, azrevrangebyscore = _twins(_plan_zrevrangebyscore)

    def _plan_zrank(
        self, key: Any, value: Any, withscore: bool = False, version: int | None = None
    ) -> Plan[Any]:
        """The rank of member ``value`` (0 scores lowest), None if absent; with
        ``withscore`` (Redis 7.2+), [rank, score]."""
        codec, pairs = self._zforms(key, version, (value,))
        convert = _ranked if withscore else _optional_int
        extra = ("WITHSCORE",) if withscore else ()
        if not pairs:
            return self._one("zrank", convert, _none, key, version, codec.zmember(value), *extra)
        redis_key = self._key(key, version)  # either form: django-redis's, then 2.0's
        commands = [("ZRANK", redis_key, member, *extra) for member in (pairs[1], pairs[0])]
        return Plan("zrank", _op_round_trip(_either(convert), commands), _none)

    zrank, azrank = _twins(_plan_zrank)

    def _plan_zrem(self, key: Any, *values: Any, version: int | None = None) -> Plan[int]:
        """Remove members from the sorted set; how many were there."""
        codec, pairs = self._zforms(key, version, values)  # either form goes
        members = [codec.zmember(value) for value in values] + pairs[::2]
        return self._one("zrem", int, _zero, key, version, *members)

    zrem, azrem = _twins(_plan_zrem)

    def _plan_zremrangebyscore(
        self, key: Any, min: float | str, max: float | str, version: int | None = None
    ) -> Plan[int]:
        """Remove the members scoring between ``min`` and ``max``; how many."""
        return self._one("zremrangebyscore", int, _zero, key, version, min, max)

    zremrangebyscore, azremrangebyscore = _twins(_plan_zremrangebyscore)

    def _plan_zscore(self, key: Any, value: Any, version: int | None = None) -> Plan[float | None]:
        """The score of member ``value``; None if it is not in the sorted set."""
        codec, pairs = self._zforms(key, version, (value,))
        if not pairs:
            return self._one("zscore", _score, _none, key, version, codec.zmember(value))
        # Either form: django-redis's, then 2.0's.
        return self._one("zmscore", _either(_score), _none, key, version, pairs[1], pairs[0])

    zscore, azscore = _twins(_plan_zscore)


# ---------------------------------------------------------------------------
# The two backends, and django-redis's get_redis_connection
# ---------------------------------------------------------------------------


class RedisEXCache(_DataStructures):
    """Sync-first Redis cache (WSGI, sessions); ``_cache`` is Django's sync client interface."""

    _client_kind = "sync"


class AsyncRedisEXCache(_DataStructures):
    """Asyncio-first Redis cache (ASGI); ``_cache.get_client()`` is a ``redis.asyncio.Redis``."""

    _client_kind = "async"


def get_redis_connection(alias: str = "default", write: bool = True) -> redis.Redis:
    """django-redis's ``get_redis_connection``: a ``redis.Redis`` on the shared pool of the
    cache ``alias``, on the server that takes writes (or, with ``write=False``, a reader)."""
    return _redis_ex_cache(alias).get_client(write=write)


async def aget_redis_connection(alias: str = "default", write: bool = True) -> redis.asyncio.Redis:
    """``get_redis_connection`` for asyncio: a ``redis.asyncio.Redis`` on the loop's pool."""
    return _redis_ex_cache(alias).get_async_client(write=write)


def _redis_ex_cache(alias: str) -> _RedisEXBase:
    cache = caches[alias]
    if not isinstance(cache, _RedisEXBase):
        raise NotImplementedError(
            f"The cache {alias!r} is a {type(cache).__name__}, not a django_redis_ex cache: "
            "get_redis_connection() gives the connections of RedisEXCache and AsyncRedisEXCache."
        )
    return cache


# ---------------------------------------------------------------------------
# Page caching: Django's cache_page and cache middleware, natively async
# ---------------------------------------------------------------------------
#
# Django's own code decides everything: which responses are cached, for how long, the headers,
# Vary, HEAD, i18n/time zone, the keys. Its FetchFromCacheMiddleware.process_request,
# UpdateCacheMiddleware.process_response, get_cache_key() and learn_cache_key() run unchanged
# against a stand-in cache (_PageSink); we make their reads and writes, with await on the
# async path. So each Django version keeps its own rules and keys (6.x changed both), and no
# Django private function is called. What this relies on beyond Django's documented API, the
# same in 5.2, 6.0 and 6.1:
# - those four reach the cache only through ``self.cache`` / ``cache=``, and call only its
#   get() and set() (learn_cache_key: one set; get_cache_key: one get);
# - request._cache_update_cache, the flag Django's two middleware halves share (ours set and
#   read it through Django's code, so either half mixes with Django's other half);
# - BaseHandler._get_response_async awaits response.render() when it is a coroutine
#   function (it is, while a template response has page writes waiting: _PageRender).
# (test_page_caching_relies_on_django_as_it_is asserts them.)

# tags=: str tags, or a callable (request, *view_args, **view_kwargs) -> str tags, per request.
PageTags: TypeAlias = Iterable[str] | Callable[..., Iterable[str]]
_PageView = TypeVar("_PageView", bound=Callable[..., Any])
_PageResult = TypeVar("_PageResult")
_PageWrite: TypeAlias = tuple[str, Any, Any]  # key, value, timeout, as Django's code sets them


class _PageSink(BaseCache):
    """The cache handed to Django's page-caching code, so that its rules and keys run as they
    are while the I/O is ours: reads answer from what was fetched (noting the keys not fetched
    yet), writes queue up for us to make."""

    def __init__(self) -> None:
        super().__init__({})
        self.found: dict[str, Any] = {}
        self.missing: list[str] = []
        self.writes: list[_PageWrite] = []
        self.snapshot = False  # set during a render: later post-render callbacks change nothing
        self.then: Callable[[], object] = lambda: None  # the sync path writes at once
        self.read: list[str] = []  # this run's reads

    def get(self, key: Any, default: Any | None = None, version: int | None = None) -> Any:
        self.read.append(key)
        if key not in self.found:
            self.missing.append(key)
        value = self.found.get(key)
        return default if value is None else value

    def set(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> None:
        self.writes.append((key, copy.deepcopy(value) if self.snapshot else value, timeout))
        self.then()

    def pop(self) -> list[_PageWrite]:
        writes, self.writes = self.writes, []
        return writes


_PAGE_SEEN = 1000  # the header keys a middleware remembers the reads after
# header key -> (the header list read under it, the request's values of those headers, the
# keys read after it)
_PageMemo: TypeAlias = dict[str, tuple[Any, tuple[Any, ...], list[str]]]


class _PageSeen:
    """Per middleware, a guess of the keys Django's process_request reads after the header
    key (its page key(s)), remembered per header key with the header list read under it and
    the request's values of the headers that list names (Django's: META names): the same
    values, the same page key. A wrong guess costs a read, never a different result."""

    def __init__(self, memo: _PageMemo, request: HttpRequest) -> None:
        self.memo, self.request = memo, request

    @staticmethod
    def values(request: HttpRequest, headers: Any) -> tuple[Any, ...] | None:
        if not isinstance(headers, list):
            return None
        meta = request.META
        return tuple(meta.get(name) for name in headers if isinstance(name, str))

    def guess(self, first: str) -> list[str]:
        known = self.memo.get(first)
        if known is None:
            return []
        headers, values, keys = known
        return keys if self.values(self.request, headers) == values else []

    def learn(self, sink: _PageSink) -> None:
        read = list(dict.fromkeys(sink.read))
        if not read:
            return
        first, memo = read[0], self.memo
        headers = sink.found.get(first)
        values = self.values(self.request, headers)
        if values is None:
            memo.pop(first, None)
            return
        if len(memo) >= _PAGE_SEEN and first not in memo:
            memo.clear()  # atomic, unlike evicting one, should loops in threads share it
        memo[first] = (headers, values, read[1:])


async def _page_replay(
    cache: BaseCache,
    run: Callable[[_PageSink], _PageResult],
    seen: _PageSeen | None = None,
) -> _PageResult:
    """``run`` (Django's code) again once the keys it read and we lacked are awaited: its reads
    are few (at most four) and depend only on the request and the values read. With ``seen``,
    the first run's key (Django's: the header key) is fetched with the keys read after it last
    time, if the request's values of the headers it named are the same (a hit: one call and
    two runs, not two calls and three); the run then uses only the values it reads."""
    sink = _PageSink()
    found = sink.found
    for _ in range(8):
        result = run(sink)
        if not sink.missing:
            if seen is not None:
                seen.learn(sink)
            return result
        keys = list(dict.fromkeys(sink.missing))
        if seen is not None and not found:
            keys += [key for key in seen.guess(keys[0]) if key not in keys]
        sink.missing.clear()
        sink.read.clear()
        if len(keys) == 1:
            found[keys[0]] = await cache.aget(keys[0])
        else:
            values = await cache.aget_many(keys)
            for key in keys:
                found[key] = values.get(key)
    raise RuntimeError("Django's page-cache code kept reading keys it had not read before.")


def _page_cache(cache: BaseCache | None) -> BaseCache:
    return caches[settings.CACHE_MIDDLEWARE_ALIAS] if cache is None else cache


async def aget_cache_key(
    request: HttpRequest,
    key_prefix: str | None = None,
    method: str = "GET",
    cache: BaseCache | None = None,
) -> str | None:
    """get_cache_key() with its read awaited: Django's own function, so the same key."""
    return await _page_replay(
        _page_cache(cache), lambda sink: get_cache_key(request, key_prefix, method, cache=sink)
    )


async def alearn_cache_key(
    request: HttpRequest,
    response: HttpResponseBase,
    cache_timeout: float | None = None,
    key_prefix: str | None = None,
    cache: BaseCache | None = None,
) -> str:
    """learn_cache_key() with its write awaited: Django's own function, so the same key."""
    sink = _PageSink()
    key = learn_cache_key(request, response, cache_timeout, key_prefix, cache=sink)
    for write in sink.pop():
        await _page_cache(cache).aset(*write)
    return key


def _page_renderable(response: HttpResponseBase) -> TypeGuard[SimpleTemplateResponse]:
    """Django's own test for a response whose caching waits for its render."""
    return hasattr(response, "render") and callable(response.render)


def _page_unrendered(response: HttpResponseBase) -> TypeGuard[SimpleTemplateResponse]:
    return _page_renderable(response) and not getattr(response, "is_rendered", True)


def _page_tag_list(tags: Iterable[str]) -> list[str]:
    if isinstance(tags, (str, bytes)):  # as set(tags=) refuses it: not its characters
        raise TypeError(f"tags= takes an iterable of str, not the string {tags!r}.")
    return list(tags)


class _PageAs:
    """A middleware as Django's own methods see it, its ``cache`` a sink: one per request,
    since concurrent requests share the middleware."""

    def __init__(self, middleware: object, cache: BaseCache) -> None:
        self._middleware, self.cache = middleware, cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._middleware, name)


class _NativeAsyncMiddleware(MiddlewareMixin):
    """MiddlewareMixin whose async mode awaits a* twins rather than running process_request
    and process_response in a thread (sync_to_async): no thread, no sync cache call."""

    sync_capable = True
    async_capable = True

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.aprocess_request(request)
        response = response or await cast(Awaitable[HttpResponseBase], self.get_response(request))
        return await self.aprocess_response(request, response)

    async def aprocess_request(self, request: HttpRequest) -> HttpResponseBase | None:
        return None

    async def aprocess_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        return response


class UpdateCacheMiddleware(_NativeAsyncMiddleware, django.middleware.cache.UpdateCacheMiddleware):
    """Django's UpdateCacheMiddleware, natively async; ``tags`` (a class attribute, or
    CacheMiddleware's argument) tags the page entry. Middleware see the view's arguments as
    the URL resolver found them."""

    page_timeout: float | None
    tags: PageTags = ()

    def process_response(
        self, request: HttpRequest, response: HttpResponseBase | str
    ) -> HttpResponseBase | str:
        update = _PageUpdate(self, request, *_page_view_args(request))
        return update.run(cast(HttpResponseBase, response))

    async def aprocess_response(
        self, request: HttpRequest, response: HttpResponseBase
    ) -> HttpResponseBase:
        return await _PageUpdate(self, request, *_page_view_args(request)).arun(response)

    def _check_tags(self) -> None:
        if not self.tags:
            return
        cache = self.cache
        if not hasattr(cache, "invalidate_tags"):
            raise ImproperlyConfigured(
                f"Page caching with tags needs a cache that takes set(..., tags=...) and has "
                f"invalidate_tags(); CACHES[{self.cache_alias!r}] is "
                f"{type(cache).__module__}.{type(cache).__qualname__}, which has neither."
            )
        if getattr(cache, "_tags", True) is None:  # this module's caches, tags not enabled
            raise ImproperlyConfigured(
                f"Page caching with tags needs OPTIONS 'tags': True in "
                f"CACHES[{self.cache_alias!r}]."
            )

    def _page_tags(self, request: HttpRequest, args: Any, kwargs: Any) -> dict[str, Any]:
        """tags= for a page entry, only when there are tags: caches without them refuse it."""
        if not self.tags:
            return {}
        self._check_tags()
        tags = self.tags(request, *args, **kwargs) if callable(self.tags) else self.tags
        found = _page_tag_list(tags)
        return {"tags": found} if found else {}


class FetchFromCacheMiddleware(
    _NativeAsyncMiddleware, django.middleware.cache.FetchFromCacheMiddleware
):
    """Django's FetchFromCacheMiddleware (its process_request, unchanged, on the sync path),
    natively async."""

    async def aprocess_request(self, request: HttpRequest) -> HttpResponseBase | None:
        fetch = django.middleware.cache.FetchFromCacheMiddleware.process_request
        return await _page_replay(
            self.cache,
            lambda sink: fetch(cast(Any, _PageAs(self, sink)), request),
            _PageSeen(self._page_memo, request),
        )

    @cached_property
    def _page_memo(self) -> _PageMemo:
        """_PageSeen's memory of this middleware."""
        return {}


class CacheMiddleware(
    UpdateCacheMiddleware, FetchFromCacheMiddleware, django.middleware.cache.CacheMiddleware
):
    """Django's CacheMiddleware, natively async, with ``tags``: cache_page's hook."""

    def __init__(
        self,
        get_response: Any,
        cache_timeout: float | None = None,
        page_timeout: float | None = None,
        *,
        tags: PageTags | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(get_response, cache_timeout, page_timeout, **kwargs)
        if tags is not None:  # else the class's: a subclass in MIDDLEWARE may set them
            self.tags = tags if callable(tags) else tuple(_page_tag_list(tags))


def _page_view_args(request: HttpRequest) -> tuple[tuple[Any, ...], dict[str, Any]]:
    match = request.resolver_match
    return (tuple(match.args), dict(match.kwargs)) if match else ((), {})


class _PageUpdate:
    """One response through Django's UpdateCacheMiddleware.process_response, against a sink;
    we make the writes it queues, the page entry tagged: at once on the sync path, awaited on
    the async one."""

    def __init__(
        self, middleware: UpdateCacheMiddleware, request: HttpRequest, args: Any, kwargs: Any
    ) -> None:
        self.middleware, self.request, self.args, self.kwargs = middleware, request, args, kwargs
        self.sink = _PageSink()

    def django(self, response: HttpResponseBase) -> HttpResponseBase:
        update = django.middleware.cache.UpdateCacheMiddleware.process_response
        as_django = cast(Any, _PageAs(self.middleware, self.sink))
        return cast(HttpResponseBase, update(as_django, self.request, response))

    def run(self, response: HttpResponseBase) -> HttpResponseBase:
        self.sink.then = self.flush  # a page write made later, by a post-render callback, too
        return self.django(response)

    async def arun(self, response: HttpResponseBase) -> HttpResponseBase:
        response = self.django(response)
        await self.aflush()
        if _page_unrendered(response):  # Django's page write waits for the render
            _PageRender.after(response, self)
        return response

    def after_view(self, response: HttpResponseBase) -> HttpResponseBase:
        """cache_page on a sync view: make_middleware_decorator's order."""
        if _page_renderable(response):
            response.add_post_render_callback(self.run)
            return response
        return self.run(response)

    async def aafter_view(self, response: HttpResponseBase) -> HttpResponseBase:
        """cache_page on an async view: the same order, writes awaited."""
        if _page_unrendered(response):
            response.add_post_render_callback(self.django)
            _PageRender.after(response, self)
            return response
        return await self.arun(response)

    def _tags(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, HttpResponseBase):  # the Vary header list: untagged
            return {}
        return self.middleware._page_tags(self.request, self.args, self.kwargs)

    def flush(self) -> None:
        cache = self.middleware.cache
        for key, value, timeout in self.sink.pop():
            cache.set(key, value, timeout, **self._tags(value))

    async def aflush(self) -> None:
        cache = self.middleware.cache
        for key, value, timeout in self.sink.pop():
            await cache.aset(key, value, timeout, **self._tags(value))


class _PageRender:
    """An unrendered response's render() while page writes wait for it. Django's ASGI handler
    awaits render() when it is a coroutine function: the render then runs in the thread Django
    would have run it in (sync_to_async, as Django calls it), and the writes are awaited after
    it. A synchronous caller (the WSGI handler serving an async view) gets a plain render and
    sync writes: it has no event loop to await them on."""

    def __init__(self, response: SimpleTemplateResponse) -> None:
        self.response, self.render = response, response.render
        self.updates: list[_PageUpdate] = []
        markcoroutinefunction(self)

    @classmethod
    def after(cls, response: SimpleTemplateResponse, update: _PageUpdate) -> None:
        update.sink.snapshot = True  # written after the render, as it was at its callback
        current = vars(response).get("render")
        if not isinstance(current, cls):  # nested cache_page: one render, the writes in order
            current = vars(response)["render"] = cls(response)
        current.updates.append(update)

    def __call__(self) -> Any:
        vars(self.response).pop("render", None)  # the class's render() again, pickles as usual
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            rendered = self.render()
            for update in self.updates:
                update.flush()
            return rendered
        return self._arender()

    async def _arender(self) -> SimpleTemplateResponse:
        rendered = await sync_to_async(self.render, thread_sensitive=True)()
        for update in self.updates:
            await update.aflush()
        return rendered


def cache_page(
    timeout: float | None,
    *,
    cache: str | None = None,
    key_prefix: str | None = None,
    tags: PageTags = (),
) -> Callable[[_PageView], _PageView]:
    """Django's cache_page (its keys, headers and rules), natively async on async views; the
    page entry tagged with ``tags``, for invalidate_tags(). As Django's, ``cache=None`` is the
    "default" cache and ``key_prefix=None`` no prefix."""

    def decorator(view: _PageView) -> _PageView:
        middleware = CacheMiddleware(
            view, page_timeout=timeout, cache_alias=cache, key_prefix=key_prefix, tags=tags
        )
        if cache is not None:
            middleware._check_tags()  # else at the first page written

        async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            response = await middleware.aprocess_request(request)
            if response is None:
                update = _PageUpdate(middleware, request, args, kwargs)
                response = await update.aafter_view(await view(request, *args, **kwargs))
            return response

        def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            response: HttpResponseBase | None = middleware.process_request(request)
            if response is None:
                update = _PageUpdate(middleware, request, args, kwargs)
                response = update.after_view(view(request, *args, **kwargs))
            return response

        wrapper = async_view if iscoroutinefunction(view) else sync_view
        return cast(_PageView, functools.wraps(view)(wrapper))

    return decorator


# ---------------------------------------------------------------------------
# System checks (manage.py check, tagged "caches"): settings that lose data or mislead
# ---------------------------------------------------------------------------

_CHECKED_BACKENDS = frozenset(  # BACKEND paths of this module's classes, 2.x and the 1.x aliases
    {
        f"{__name__}.RedisEXCache",
        f"{__name__}.AsyncRedisEXCache",
        f"{__name__}.cache.RedisEXCache",
        f"{__name__}.async_cache.AsyncRedisEXCache",
    }
)
_SESSIONS_CACHE = "django.contrib.sessions.backends.cache"
_SESSIONS_CACHED_DB = "django.contrib.sessions.backends.cached_db"
# Top-level CACHES keys that Django's BaseCache or this backend read (BaseCache reads the
# lower-case timeout, max_entries and cull_frequency at the top level too).
_TOP_LEVEL_KEYS = frozenset(
    {
        "BACKEND",
        "LOCATION",
        "OPTIONS",
        "TIMEOUT",
        "KEY_PREFIX",
        "VERSION",
        "KEY_FUNCTION",
        "REVERSE_KEY_FUNCTION",
        "timeout",
        "max_entries",
        "cull_frequency",
    }
)
# Options that only Sentinel reads: without "sentinels", _Config checks them and drops them.
_SENTINEL_ONLY = ("sentinel_kwargs", "sentinel_replica_reads")
# RedisCluster's replica-read options: the shells send every call to its slot's primary, so only
# get_client()'s RedisCluster (and the path OPTIONS retries choose) would read replicas.
_CLUSTER_REPLICA_READS = ("read_from_replicas", "load_balancing_strategy")
_REDIS_RETRIES = ("retry", "retry_on_error", "retry_on_timeout")  # as _Config: not direct
_ADD_SENTINELS = (
    "Add OPTIONS 'sentinels' (LOCATION then names the service: "
    "redis://[:password@]service_name[/db]), or remove it."
)


def _option_names() -> frozenset[str]:
    """Every key OPTIONS may hold: this module's, django-redis's, and redis-py's pool, connection
    and cluster arguments (what _Config._check_keys accepts on some topology)."""
    modules = (redis.connection, redis.asyncio.connection)
    names = ("Connection", "SSLConnection", "UnixDomainSocketConnection")
    redis_py = _accepted_arguments(
        _WaitingPool,
        _AsyncWaitingPool,
        *(getattr(module, name) for module in modules for name in names),
        redis.cluster.RedisCluster,
        redis.asyncio.cluster.RedisCluster,
    )
    return frozenset({*_OWN_OPTIONS, *_DJANGO_REDIS_OPTIONS, *redis_py})


def _checked_caches() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """This module's CACHES entries: alias -> (entry, OPTIONS in this module's names). Entries
    whose OPTIONS the module refuses are left out (building the cache reports them)."""
    found: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for alias, entry in getattr(settings, "CACHES", {}).items():
        if not isinstance(entry, dict) or entry.get("BACKEND") not in _CHECKED_BACKENDS:
            continue
        options = entry.get("OPTIONS") or {}
        if not isinstance(options, dict):
            continue
        try:
            options, _translated = _from_django_redis(options)
        except Exception:  # refused (or not even names): building the cache says why
            continue
        found[alias] = (entry, options)
    return found


def _where(alias: str) -> str:
    return f"CACHES[{alias!r}]"


def _check_sessions(
    caches_: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> list[checks.CheckMessage]:
    """W001, W002: the alias that sessions are stored in."""
    engine = getattr(settings, "SESSION_ENGINE", "")
    alias = getattr(settings, "SESSION_CACHE_ALIAS", "default")
    if engine not in (_SESSIONS_CACHE, _SESSIONS_CACHED_DB) or not isinstance(alias, str):
        return []
    if alias not in caches_:
        return []
    options = caches_[alias][1]
    found: list[checks.CheckMessage] = []
    # W001: only the pure cache engine. With cached_db the database holds every session: a
    # failed read falls back to it and a failed write lost nothing but the cached copy (Django
    # logs cached_db's failed cache writes itself); ignore_exceptions changes nothing there.
    if engine == _SESSIONS_CACHE and options.get("ignore_exceptions") is True:
        found.append(
            checks.Warning(
                f"Sessions are stored in cache {alias!r}, whose OPTIONS 'ignore_exceptions' "
                "hides Redis failures: during an outage every session reads as empty (users "
                "are logged out) and session writes are dropped without an error.",
                hint="Point SESSION_CACHE_ALIAS at an alias without 'ignore_exceptions', or use "
                f"SESSION_ENGINE {_SESSIONS_CACHED_DB!r}.",
                obj=_where(alias),
                id="django_redis_ex.W001",
            )
        )
    # W002: both engines read the cache first. client_cache is on for True and for a dict of
    # settings, {} included (only False and None turn it off).
    if options.get("client_cache") not in (None, False):
        found.append(
            checks.Warning(
                f"Sessions are stored in cache {alias!r}, whose OPTIONS 'client_cache' serves "
                "reads from each process's memory: a worker may read a session that another "
                "changed or ended (login, logout) until the invalidation reaches it, up to two "
                "heartbeat intervals while tracking stalls.",
                hint="Give SESSION_CACHE_ALIAS an alias of its own without 'client_cache'.",
                obj=_where(alias),
                id="django_redis_ex.W002",
            )
        )
    return found


# W003, and why not "sign_values without SECRET_KEY_FALLBACKS". _SignedCodec keys its HMAC from
# SECRET_KEY and verifies with SECRET_KEY_FALLBACKS too, so Django's documented rotation (the
# old key moved into SECRET_KEY_FALLBACKS) keeps every signed entry readable. An empty
# SECRET_KEY_FALLBACKS is the normal state between rotations: a Warning on it would fire for
# every sign_values user with nothing to do but silence it, and an Info would print on every
# manage.py command (BaseCommand.check prints INFOS) for advice that belongs in the README. A
# rotation without the fallback breaks Django's own signing (sessions' cookies, password reset
# links) as much as this cache, and no setting shows it beforehand. What settings do show is a
# fallback list that sign_values misuses, which Django reports only with --deploy (W025) or at
# settings load (a str, from a settings module only):
# - an empty entry: its HMAC key, sha256(salt), is public: whoever can write to Redis signs
#   values that verify and are unpickled, which is what sign_values exists to prevent;
# - an entry that is not a str or bytes (None from os.environ.get): the cache raises
#   AttributeError when first built, at a request rather than at startup;
# - the setting a str itself (settings.configure, override_settings): each character becomes
#   a key, so the old key is not honoured and every entry signed with it reads as forged.
def _check_signing_keys(
    caches_: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> list[checks.CheckMessage]:
    signed = [
        alias for alias, (_, options) in caches_.items() if options.get("sign_values") is True
    ]
    if not signed:
        return []
    fallbacks = getattr(settings, "SECRET_KEY_FALLBACKS", [])
    names = ", ".join(map(repr, signed))
    if isinstance(fallbacks, (str, bytes)):
        problems = [("SECRET_KEY_FALLBACKS", "is a string, not a list: each character is a key")]
    elif not isinstance(fallbacks, (list, tuple)):
        problems = [("SECRET_KEY_FALLBACKS", f"is {fallbacks!r}, not a list of keys")]
    else:
        problems = []
        for index, key in enumerate(fallbacks):
            where = f"SECRET_KEY_FALLBACKS[{index}]"
            if not isinstance(key, (str, bytes)):
                problems.append((where, f"is {key!r}, not a key: the cache fails when built"))
            elif not key.strip():
                problems.append((where, "is empty: values signed with it can be forged"))
    return [
        checks.Warning(
            f"OPTIONS 'sign_values' (cache {names}) verifies values with every "
            f"SECRET_KEY_FALLBACKS entry, and {where} {why}.",
            hint="Make SECRET_KEY_FALLBACKS a list of the previous SECRET_KEY values only "
            "(an empty list if there is none).",
            obj=where,
            id="django_redis_ex.W003",
        )
        for where, why in problems
    ]


# W004: Sentinel and Cluster settings (and any OPTIONS key) where the module reads nothing.
# Left out, as the module refuses them already (ImproperlyConfigured when the cache is built,
# which Django's caches check does): 'sentinels' with 'cluster' or 'pool_class'; several
# LOCATION URLs with 'sentinels'; a LOCATION /db with 'cluster'; RedisCluster arguments
# (read_from_replicas, require_full_coverage, ...) without 'cluster'; unknown OPTIONS keys.
def _check_topology(
    alias: str, entry: dict[str, Any], options: dict[str, Any]
) -> list[tuple[str, str]]:
    """W004's findings for one alias: (message, hint) pairs."""
    found: list[tuple[str, str]] = []
    misplaced = sorted((set(entry) - _TOP_LEVEL_KEYS) & _option_names(), key=str)
    for name in misplaced:  # Django's BaseCache ignores unknown top-level keys
        found.append(
            (
                f"{_where(alias)}[{name!r}] is ignored: this backend reads it only in OPTIONS.",
                f"Move {name!r} into OPTIONS.",
            )
        )
    cluster = options.get("cluster") is True
    if not options.get("sentinels"):
        for name in _SENTINEL_ONLY:
            if options.get(name):  # sentinel_kwargs {} or None, replica reads False: nothing
                where = ", and this cache is a Cluster." if cluster else "."
                hint = "Remove it." if cluster else _ADD_SENTINELS
                found.append((f"OPTIONS {name!r} is ignored: it needs 'sentinels'{where}", hint))
    if cluster and not any(name in options for name in _REDIS_RETRIES):
        for name in _CLUSTER_REPLICA_READS:
            if options.get(name):
                found.append(
                    (
                        f"OPTIONS {name!r} does not apply to the cache's calls: with 'cluster' "
                        "they go to each slot's primary; only get_client()'s RedisCluster "
                        "reads it.",
                        f"Remove {name!r}, unless only get_client() is meant to read replicas.",
                    )
                )
    return found


def _check_topologies(
    caches_: dict[str, tuple[dict[str, Any], dict[str, Any]]],
) -> list[checks.CheckMessage]:
    found: list[checks.CheckMessage] = []
    for alias, (entry, options) in caches_.items():
        for msg, hint in _check_topology(alias, entry, options):
            found.append(
                checks.Warning(msg, hint=hint, obj=_where(alias), id="django_redis_ex.W004")
            )
    return found


@checks.register(checks.Tags.caches)
def _check_caches(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System checks of this module's CACHES entries (no I/O: settings only)."""
    caches_ = _checked_caches()
    if not caches_:
        return []
    return [*_check_sessions(caches_), *_check_signing_keys(caches_), *_check_topologies(caches_)]


# ---------------------------------------------------------------------------
# The dotted paths of the 1.x package: django_redis_ex.cache and django_redis_ex.async_cache
# ---------------------------------------------------------------------------

for _name, _cls in (("cache", RedisEXCache), ("async_cache", AsyncRedisEXCache)):
    _alias = types.ModuleType(f"{__name__}.{_name}", f"Alias of {__name__}.{_cls.__name__}.")
    setattr(_alias, _cls.__name__, _cls)
    sys.modules[_alias.__name__] = _alias
