"""The one safetensors header parser: reads and validates a header without loading any tensor.

Used by the checkpoint reader (headers of multi-GB files) and the fix-table reader. A safetensors
file is ``<u64 little-endian header length n><n bytes of JSON><tensor data>``; the JSON maps tensor
names to ``{dtype, shape, data_offsets}`` plus an optional ``__metadata__`` string map.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

#: Largest header accepted (safetensors' own limit is 100 MB).
MAX_HEADER = 100 * 1024 * 1024


def read_header(f: BinaryIO, size: int, where: str,
                error: type[Exception] = ValueError) -> tuple[dict[str, Any], int]:
    """``(header, header length)`` of the safetensors data in ``f`` (positioned at its start; ``size``
    bytes in all). Raises ``error`` with a message starting with ``where`` when the file is not a
    safetensors file, is corrupt or is truncated."""
    raw_len = f.read(8)
    if len(raw_len) < 8:
        raise error(f"{where}: not a safetensors file or truncated (only {size} bytes)")
    (n,) = struct.unpack("<Q", raw_len)
    if n == 0 or n > MAX_HEADER or 8 + n > size:
        raise error(f"{where}: not a safetensors file or truncated (header length {n}, file size {size})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error(f"{where}: corrupt safetensors header: the header is not JSON") from None
    if not isinstance(header, dict):
        raise error(f"{where}: corrupt safetensors header: the header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        try:
            end = max(end, int(offsets[1]))
        except (TypeError, ValueError, IndexError):
            raise error(f"{where}: corrupt safetensors header: tensor {name!r} has no data_offsets") from None
    if 8 + n + end > size:
        raise error(f"{where}: file is truncated: its tensors need {8 + n + end} bytes, the file has {size} "
                    "(incomplete download or copy?)")
    return header, n
