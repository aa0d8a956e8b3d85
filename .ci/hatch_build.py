"""Hatchling build hook: the wheel installs django_redis_ex.py as a typed package.

PEP 561 reads a ``py.typed`` marker only in a package, so the wheel holds the one source file
as ``django_redis_ex/__init__.py`` next to an empty ``django_redis_ex/py.typed`` (and stubs
of the legacy dotted paths); the
repository keeps the single file that vendoring copies. The legacy dotted paths
(``django_redis_ex.cache``, ``django_redis_ex.async_cache``) are the aliases that the module
registers in ``sys.modules`` at import. An editable install maps nothing here: its ``.pth``
(``dev-mode-dirs`` in pyproject.toml) puts the checkout on ``sys.path``, so edits are live.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.builders.wheel import WheelBuilderConfig


class TypedPackage(BuildHookInterface[WheelBuilderConfig]):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        self._marker_dir = tempfile.mkdtemp(prefix="django_redis_ex-build-")
        generated = {
            "py.typed": "",
            # The legacy dotted paths, for type checkers (at run time, sys.modules aliases).
            "cache.pyi": "from django_redis_ex import RedisEXCache as RedisEXCache\n",
            "async_cache.pyi": (
                "from django_redis_ex import AsyncRedisEXCache as AsyncRedisEXCache\n"
            ),
        }
        for name, text in generated.items():
            path = os.path.join(self._marker_dir, name)
            with open(path, "w", encoding="utf-8") as file:
                file.write(text)
            build_data["force_include"][path] = f"django_redis_ex/{name}"
        module = os.path.join(self.root, "django_redis_ex.py")
        build_data["force_include"][module] = "django_redis_ex/__init__.py"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if version != "editable":
            shutil.rmtree(self._marker_dir, ignore_errors=True)
