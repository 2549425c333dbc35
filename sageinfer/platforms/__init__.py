"""Hardware adaptation: the only place that knows device names and vendor APIs.

Platforms are plugins: each registers a Platform subclass under the entry point group
`sageinfer.platform_plugins` ("name = module:Class"), the in-tree ones too (pyproject.toml), so a
vendor package can ship its chip's platform without changing this one. The platform used is the one
named (`device=` / `--device`, else the SAGEINFER_PLATFORM environment variable), or else the
available one of highest `priority` (accelerators before the CPU).
"""
from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

from sageinfer.platforms.ascend import AscendPlatform
from sageinfer.platforms.base import Platform
from sageinfer.platforms.cambricon import CambriconPlatform
from sageinfer.platforms.cpu import CpuPlatform
from sageinfer.platforms.cuda import CudaPlatform
from sageinfer.platforms.kunlun import KunlunPlatform
from sageinfer.platforms.rocm import RocmPlatform

logger = logging.getLogger(__name__)
PLUGIN_GROUP = "sageinfer.platform_plugins"
ENV_VAR = "SAGEINFER_PLATFORM"
# The in-tree platforms, for a source tree whose entry points are not installed.
_IN_TREE: dict[str, type[Platform]] = {"ascend": AscendPlatform, "cambricon": CambriconPlatform,
                                       "kunlun": KunlunPlatform, "rocm": RocmPlatform, "cuda": CudaPlatform,
                                       "cpu": CpuPlatform}

_current: Platform | None = None


def registered_platforms() -> dict[str, type[Platform]]:
    """Every platform the installed packages register, highest priority first. A plugin that fails
    to load is reported and left out; the others stay usable."""
    found: dict[str, type[Platform]] = {}
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # noqa: BLE001 - a vendor's broken install must not stop the others
            logger.warning("platform plugin %r (%s) could not be loaded: %s: %s", entry.name, entry.value,
                           type(exc).__name__, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            logger.warning("platform plugin %r (%s) is not a Platform subclass; ignored", entry.name, entry.value)
            continue
        found[entry.name] = cls
    for name, cls in _IN_TREE.items():
        found.setdefault(name, cls)
    return dict(sorted(found.items(), key=lambda item: -item[1].priority))


def get_platform(name: str | None = None) -> Platform:
    """The platform named (a device string such as "cuda:1" names "cuda"), the one SAGEINFER_PLATFORM
    names, or the first available one."""
    global _current
    name = name or os.environ.get(ENV_VAR) or None
    if name is not None:
        platforms = registered_platforms()
        key = name.split(":")[0]
        if key not in platforms:
            raise ValueError(f"device must be one of {list(platforms)}, got {name!r}")
        if not platforms[key].is_available():
            raise ValueError(f"device {name!r} is not available on this machine (platform {platforms[key].__name__})")
        return platforms[key]()
    if _current is None:
        _current = next(cls() for cls in registered_platforms().values() if cls.is_available())
    return _current


__all__ = ["Platform", "get_platform", "registered_platforms"]
