"""Hardware adaptation: the only place that knows device names and vendor APIs.

Adding a chip family means adding one module here and one entry in _PLATFORMS.
"""
from __future__ import annotations

from sageinfer.platforms.base import Platform
from sageinfer.platforms.cpu import CpuPlatform
from sageinfer.platforms.cuda import CudaPlatform

# Probed in order; the first available wins. CPU is always last.
_PLATFORMS: dict[str, type[Platform]] = {"cuda": CudaPlatform, "cpu": CpuPlatform}

_current: Platform | None = None


def get_platform(name: str | None = None) -> Platform:
    """The platform named, or the first available one."""
    global _current
    if name is not None:
        key = name.split(":")[0]
        if key not in _PLATFORMS:
            raise ValueError(f"device must be one of {list(_PLATFORMS)}, got {name!r}")
        platform_cls = _PLATFORMS[key]
        if not platform_cls.is_available():
            raise ValueError(f"device {name!r} is not available on this machine")
        return platform_cls()
    if _current is None:
        _current = next(cls() for cls in _PLATFORMS.values() if cls.is_available())
    return _current


__all__ = ["Platform", "get_platform"]
