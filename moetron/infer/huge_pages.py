"""Serving weights on transparent huge pages (Linux, CPU).

A decode step streams every active weight from DRAM once; with 4 KiB pages that is a TLB miss per
4 KiB, 70,000 page walks per token for a 280 MB model. Where THP is in `madvise` mode (the common
default), memory must ask for 2 MiB pages itself. `move_to_huge_pages` re-allocates each large
parameter inside a torch-owned buffer, asks the kernel for huge pages on its 2 MiB-aligned part
before the first touch, and copies the weights in. torch still owns and frees the memory; where
huge pages are unavailable the call changes nothing but the tensors' addresses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import sys

import torch
from torch import nn

HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def huge_page_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D CPU tensor whose 2 MiB-aligned pages were advised to be huge."""
    itemsize = dtype.itemsize
    slack = HUGE_PAGE // itemsize
    buffer = torch.empty(numel + slack, dtype=dtype)
    address = buffer.data_ptr()
    first = (-address % HUGE_PAGE) // itemsize
    tensor = buffer[first : first + numel]
    madvise = _madvise()
    if madvise is not None:
        aligned_bytes = (numel * itemsize) // HUGE_PAGE * HUGE_PAGE
        if aligned_bytes:
            madvise(tensor.data_ptr(), aligned_bytes, MADV_HUGEPAGE)  # a refusal is harmless
    return tensor


@torch.no_grad()
def move_to_huge_pages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Re-home every CPU parameter of at least `min_bytes` on huge pages, and every quantized weight
    (uint8 buffers: moetron/quant/quantize.py); returns bytes moved. Tied parameters stay tied
    (`parameters()` yields a shared one once, and `.data` swaps in place)."""
    total = 0
    quantized = (buffer for buffer in model.buffers() if buffer.dtype == torch.uint8)
    for param in itertools.chain(model.parameters(), quantized):
        if param.device.type != "cpu" or param.nbytes < min_bytes or not param.is_contiguous():
            continue
        fresh = huge_page_empty(param.numel(), param.dtype).view(param.shape)
        fresh.copy_(param)
        param.data = fresh
        total += param.nbytes
    return total
