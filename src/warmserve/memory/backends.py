"""Physical pages and virtual ranges: CUDA virtual memory, and a host twin with the same rules.

A backend creates physical pages once, reserves virtual address ranges, maps a page at a page-
aligned address of a range, unmaps, and gives a torch tensor over a mapped range. The host
backend does this for real too: pages are offsets of one memfd, ranges are PROT_NONE
reservations, and mapping is mmap(MAP_FIXED) — so every piece of pool logic, including "reading
an unmapped address is an error", is exercised on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import Any, Protocol

import torch


class MemoryBackendError(RuntimeError):
    """A driver or OS call failed; the message names the call and the error."""


class PageBackend(Protocol):
    page_bytes: int
    device: torch.device

    def create_pages(self, count: int) -> list[Any]: ...
    def release_pages(self, pages: list[Any]) -> None: ...
    def reserve(self, nbytes: int) -> int: ...
    def free_range(self, va: int, nbytes: int) -> None: ...
    def map(self, va: int, page: Any) -> None: ...
    def set_access(self, va: int, nbytes: int) -> None: ...
    def unmap(self, va: int, nbytes: int) -> None: ...
    def tensor(self, va: int, nbytes: int) -> torch.Tensor: ...
    def bind_thread(self) -> None: ...


# --- host ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0


class HostBackend:
    """Pages of one memfd, mapped into PROT_NONE reservations with mmap(MAP_FIXED)."""

    def __init__(self, page_bytes: int = 2 << 20) -> None:
        if page_bytes % mmap.PAGESIZE:
            raise ValueError(f"page_bytes={page_bytes} is not a multiple of {mmap.PAGESIZE}")
        self.page_bytes = page_bytes
        self.device = torch.device("cpu")
        self._fd = os.memfd_create("warmserve-pool")
        self._num_pages = 0
        self._lock = threading.Lock()

    def create_pages(self, count: int) -> list[int]:
        with self._lock:
            first = self._num_pages
            self._num_pages += count
            os.ftruncate(self._fd, self._num_pages * self.page_bytes)
        return list(range(first, first + count))

    def release_pages(self, pages: list[int]) -> None:
        """Release every page (the pool releases all at once): the memfd shrinks to nothing."""
        with self._lock:
            if len(pages) != self._num_pages:
                raise MemoryBackendError(
                    f"host pages are released all at once: {len(pages)} of {self._num_pages}")
            os.ftruncate(self._fd, 0)
            self._num_pages = 0

    def reserve(self, nbytes: int) -> int:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        return self._mmap(None, nbytes, _PROT_NONE, flags, -1, 0, "reserve")

    def free_range(self, va: int, nbytes: int) -> None:
        if _libc.munmap(va, nbytes) != 0:
            raise MemoryBackendError(f"munmap failed: {os.strerror(ctypes.get_errno())}")

    def map(self, va: int, page: int) -> None:
        self._mmap(va, self.page_bytes, mmap.PROT_READ | mmap.PROT_WRITE,
                   mmap.MAP_SHARED | _MAP_FIXED, self._fd, page * self.page_bytes, "map")

    def set_access(self, va: int, nbytes: int) -> None:
        """Host mappings are accessible as soon as they exist."""

    def unmap(self, va: int, nbytes: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
        self._mmap(va, nbytes, _PROT_NONE, flags, -1, 0, "unmap")  # back to reserved

    def tensor(self, va: int, nbytes: int) -> torch.Tensor:
        buffer = (ctypes.c_uint8 * nbytes).from_address(va)
        return torch.frombuffer(buffer, dtype=torch.uint8)

    def bind_thread(self) -> None:
        """Host mappings need no per-thread context."""

    def _mmap(self, va: int | None, nbytes: int, prot: int, flags: int, fd: int, offset: int,
              what: str) -> int:
        result = _libc.mmap(va, nbytes, prot, flags, fd, offset)
        if result in (None, _MAP_FAILED):
            raise MemoryBackendError(f"{what}: mmap failed: {os.strerror(ctypes.get_errno())}")
        return result


# --- CUDA ------------------------------------------------------------------------------------


class _CudaArray:
    """Exposes a device range through __cuda_array_interface__ so torch can view it."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
            "strides": None,
        }


class CudaVmmBackend:
    """CUDA virtual memory management through cuda.bindings.driver (cuMemCreate & co)."""

    def __init__(self, device: int = 0, page_bytes: int = 2 << 20) -> None:
        from cuda.bindings import driver

        self._drv = driver
        self.device = torch.device("cuda", device)
        torch.cuda.init()
        torch.empty(1, device=self.device)  # make torch's primary context current
        self._ctx = self._check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        granularity = self._check(driver.cuMemGetAllocationGranularity(
            prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity")
        if page_bytes % granularity:
            raise ValueError(f"page_bytes={page_bytes} is not a multiple of the device's "
                             f"granularity {granularity}")
        self.page_bytes = page_bytes
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access

    def bind_thread(self) -> None:
        self._check(self._drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def create_pages(self, count: int) -> list[Any]:
        return [self._check(self._drv.cuMemCreate(self.page_bytes, self._prop, 0), "cuMemCreate")
                for _ in range(count)]

    def release_pages(self, pages: list[Any]) -> None:
        for page in pages:
            self._check(self._drv.cuMemRelease(page), "cuMemRelease")

    def reserve(self, nbytes: int) -> int:
        ptr = self._check(self._drv.cuMemAddressReserve(nbytes, self.page_bytes, 0, 0),
                          "cuMemAddressReserve")
        return int(ptr)

    def free_range(self, va: int, nbytes: int) -> None:
        self._check(self._drv.cuMemAddressFree(va, nbytes), "cuMemAddressFree")

    def map(self, va: int, page: Any) -> None:
        self._check(self._drv.cuMemMap(va, self.page_bytes, 0, page, 0), "cuMemMap")

    def set_access(self, va: int, nbytes: int) -> None:
        self._check(self._drv.cuMemSetAccess(va, nbytes, [self._access], 1), "cuMemSetAccess")

    def unmap(self, va: int, nbytes: int) -> None:
        self._check(self._drv.cuMemUnmap(va, nbytes), "cuMemUnmap")

    def tensor(self, va: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(va, nbytes), device=self.device)

    def _check(self, result: Any, call: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._drv.CUresult.CUDA_SUCCESS:
            _, name = self._drv.cuGetErrorName(err)
            raise MemoryBackendError(f"{call} failed: {name.decode() if name else err}")
        return values[0] if len(values) == 1 else (values or None)
