"""trainer.steady_malloc: glibc's mmap and trim thresholds pinned at the start of a run."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest
from _config import compose_config
from _trainer_helpers import TINY

from trainers.core import malloc


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``mallinfo2`` (2.33 or later), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


LIBC = glibc()


@pytest.mark.skipif(LIBC is None, reason="needs glibc 2.33+ (mallinfo2)")
def test_blocks_below_32_mib_come_from_the_heap_and_larger_ones_are_still_mapped() -> None:
    assert malloc.steady_malloc()
    mapped = lambda: LIBC.mallinfo2().hblkhd  # noqa: E731 - bytes in mmapped blocks
    before = mapped()
    block = LIBC.malloc(16 << 20)
    assert block and mapped() == before  # a 16 MiB activation: heap memory, reused after free
    LIBC.free(block)
    block = LIBC.malloc(64 << 20)
    assert block and mapped() >= before + (64 << 20)  # above the threshold: its own mapping, as before
    LIBC.free(block)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_run_pins_the_thresholds_unless_disabled(enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainers.core.config import without_hydra
    from trainers.experiments.session import Session

    calls: list[bool] = []
    monkeypatch.setattr(malloc, "steady_malloc", lambda: calls.append(True) or True)
    Session(without_hydra(compose_config([*TINY, f"trainer.steady_malloc={str(enabled).lower()}"])))
    assert calls == ([True] if enabled else [])
