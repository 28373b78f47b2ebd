"""The fix-table format: one safetensors file per (reference model, target model, layers) table.

A fix table holds per-dimension statistics of a *reference* encoder (what the DiT was trained on,
e.g. Qwen3-4B at HF ``hidden_states[-2]``) and of a *target* encoder (the substitute), plus
metadata describing how they were measured. The fixes (``fixes.py``) and blending (``blend.py``)
only need these vectors. ``fix_tables/README.md`` documents the format for users.

Tensors (all float32, contiguous):

- required, shape ``[D]``: ``reference_mean``, ``reference_std``, ``target_mean``, ``target_std``
- optional, shape ``[D]``: percentiles ``{reference,target}_p{0_1,1,50,99,99_9}``
- optional adapter: ``adapter_weight`` ``[D, D]`` and ``adapter_bias`` ``[D]``

Writes are atomic (temp file in the destination directory, fsync, ``os.replace``) and never
overwrite an existing file unless asked to. Loading validates everything and raises
:class:`FixTableError` naming the file and the problem.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np
import torch

from .config import OLD_NAMES, Thresholds
from .safetensors_header import read_header

FORMAT = "zimage-dimfix.fix-table"
#: Version written by this module. Readers accept any version with the same major number.
#: 1.1 added the optional ``reference_layer`` metadata key.
VERSION = "1.1"
SUPPORTED_MAJOR = 1

REQUIRED_TENSORS = ("reference_mean", "reference_std", "target_mean", "target_std")
SIDES = ("reference", "target")
#: Percentiles a table may carry, as ``q`` (in percent) -> name suffix.
PERCENTILES: dict[float, str] = {0.1: "p0_1", 1.0: "p1", 50.0: "p50", 99.0: "p99", 99.9: "p99_9"}
ADAPTER_TENSORS = ("adapter_weight", "adapter_bias")
KNOWN_EXTRAS = tuple(f"{s}_{p}" for s in SIDES for p in PERCENTILES.values()) + ADAPTER_TENSORS

#: Metadata keys stored besides ``format`` and ``version``.
META_KEYS = ("reference_model", "target_model", "layer", "reference_layer", "template", "token_scope",
             "prompt_count", "token_count", "created", "thresholds")

_CHUNK = 1 << 20


class FixTableError(ValueError):
    """A fix table is invalid, unreadable, or cannot be written."""


def percentile_name(side: str, q: float) -> str:
    """Tensor name of percentile ``q`` (percent, e.g. 99.9) of ``side`` ('reference' or 'target')."""
    if side not in SIDES:
        raise ValueError(f"side must be 'reference' or 'target', got {side!r}")
    for known, suffix in PERCENTILES.items():
        if math.isclose(float(q), known, rel_tol=0, abs_tol=1e-9):
            return f"{side}_{suffix}"
    raise ValueError(f"percentile q must be one of {sorted(PERCENTILES)} (percent), got {q!r}")


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix, second precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class FixTableMeta:
    """Provenance of a fix table. All fields are stored as strings in the safetensors metadata.

    ``layer`` is the target's HF ``hidden_states`` index (int, e.g. -6) or ``"sweep"``;
    ``reference_layer`` the reference's (int, e.g. -2; ``None`` when constructing = the same as
    ``layer``, which is also what tables without the key are read as); ``token_scope`` names the
    token classes the statistics cover (e.g. ``"content"``); ``thresholds`` are the classification
    thresholds the table was analysed with (fixes use them unless overridden).
    """

    reference_model: str = ""
    target_model: str = ""
    layer: int | str = -2
    reference_layer: int | str | None = None
    template: str = ""
    token_scope: str = "content"
    prompt_count: int = 0
    token_count: int = 0
    created: str = field(default_factory=utc_now_iso)
    thresholds: Thresholds = field(default_factory=Thresholds)
    version: str = VERSION

    def __post_init__(self) -> None:
        if self.reference_layer is None:
            self.reference_layer = self.layer

    def to_strings(self) -> dict[str, str]:
        return {
            "reference_model": str(self.reference_model),
            "target_model": str(self.target_model),
            "layer": str(self.layer),
            "reference_layer": str(self.layer if self.reference_layer is None else self.reference_layer),
            "template": str(self.template),
            "token_scope": str(self.token_scope),
            "prompt_count": str(int(self.prompt_count)),
            "token_count": str(int(self.token_count)),
            "created": str(self.created),
            "thresholds": self.thresholds.to_json(),
        }

    @classmethod
    def from_strings(cls, meta: Mapping[str, str], where: str = "fix table") -> "FixTableMeta":
        meta = {OLD_NAMES.get(k, k): v for k, v in meta.items()}  # earlier key names -> their one name
        def as_int(key: str) -> int:
            text = meta.get(key, "0")
            try:
                return int(text)
            except ValueError:
                raise FixTableError(f"{where}: metadata {key!r} must be an integer, got {text!r}") from None

        layer_text = meta.get("layer", "-2")
        try:
            layer: int | str = int(layer_text)
        except ValueError:
            layer = layer_text
        ref_text = meta.get("reference_layer")
        reference_layer: int | str | None = None  # absent (tables before 1.1): the same as 'layer'
        if ref_text is not None:
            try:
                reference_layer = int(ref_text)
            except ValueError:
                reference_layer = ref_text
        try:
            thresholds = Thresholds.from_json(meta["thresholds"]) if meta.get("thresholds") else Thresholds()
        except (ValueError, TypeError) as exc:
            raise FixTableError(f"{where}: metadata 'thresholds' is not valid thresholds JSON ({exc})") from None
        return cls(reference_model=meta.get("reference_model", ""), target_model=meta.get("target_model", ""),
                   layer=layer, reference_layer=reference_layer, template=meta.get("template", ""),
                   token_scope=meta.get("token_scope", ""),
                   prompt_count=as_int("prompt_count"), token_count=as_int("token_count"),
                   created=meta.get("created", ""), thresholds=thresholds, version=meta.get("version", VERSION))


def _as_float32(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise FixTableError(f"fix table tensor {name!r} must be a torch.Tensor or numpy array, "
                            f"got {type(value).__name__}")
    return value.detach().to(device="cpu", dtype=torch.float32).contiguous()


@dataclass
class FixTable:
    """Per-dimension reference and target statistics plus optional extras (see module docstring).

    Tensors given as other float dtypes or numpy arrays are converted to contiguous float32 CPU
    tensors. Call :meth:`validate` (``save_fix_table`` does) to check shapes and values.
    """

    reference_mean: torch.Tensor
    reference_std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: FixTableMeta = field(default_factory=FixTableMeta)

    def __post_init__(self) -> None:
        for name in REQUIRED_TENSORS:
            setattr(self, name, _as_float32(name, getattr(self, name)))
        self.extras = {str(k): _as_float32(str(k), v) for k, v in dict(self.extras).items()}

    @property
    def dim(self) -> int:
        return int(self.reference_mean.shape[-1]) if self.reference_mean.ndim else 0

    @property
    def thresholds(self) -> Thresholds:
        return self.meta.thresholds

    def percentile(self, side: str, q: float) -> torch.Tensor | None:
        """Percentile ``q`` (percent) of ``side`` as float32 [D], or None when the table lacks it."""
        return self.extras.get(percentile_name(side, q))

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors by their file names."""
        out = {name: getattr(self, name) for name in REQUIRED_TENSORS}
        out.update(self.extras)
        return out

    def validate(self, where: str = "fix table") -> "FixTable":
        """Raise :class:`FixTableError` unless shapes, dtypes and values are consistent."""
        _validate_tensors(self.tensors(), where)
        for key in ("reference_model", "target_model", "template", "token_scope", "created"):
            if not isinstance(getattr(self.meta, key), str):
                raise FixTableError(f"{where}: metadata {key!r} must be a string")
        layer = self.meta.layer
        if isinstance(layer, bool) or not (isinstance(layer, int) or layer == "sweep"):
            raise FixTableError(f"{where}: metadata 'layer' must be an int HF index or 'sweep', got {layer!r}")
        ref_layer = layer if self.meta.reference_layer is None else self.meta.reference_layer
        if isinstance(ref_layer, bool) or not (isinstance(ref_layer, int) or ref_layer == layer == "sweep"):
            raise FixTableError(f"{where}: metadata 'reference_layer' must be an int HF index (e.g. -2), got "
                                f"{ref_layer!r}")
        if not isinstance(self.meta.thresholds, Thresholds):
            raise FixTableError(f"{where}: metadata 'thresholds' must be a dimfix.config.Thresholds")
        return self


def _validate_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    missing = [n for n in REQUIRED_TENSORS if n not in tensors]
    if missing:
        raise FixTableError(f"{where}: required tensor(s) missing: {', '.join(missing)}")
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise FixTableError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected torch.float32")
    dim = tensors["reference_mean"].shape
    if len(dim) != 1 or dim[0] == 0:
        raise FixTableError(f"{where}: tensor 'reference_mean' has shape {tuple(dim)}, expected [D] with D > 0")
    d = int(dim[0])
    for name, t in tensors.items():
        expected = (d, d) if name == "adapter_weight" else (d,)
        if name not in REQUIRED_TENSORS and name not in KNOWN_EXTRAS:
            continue  # unknown extras: kept as they are, dtype and values checked below
        if tuple(t.shape) != expected:
            raise FixTableError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {list(expected)} "
                                f"(D = {d} from 'reference_mean')")
    for name, t in tensors.items():
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        if n_nan or n_inf:
            raise FixTableError(f"{where}: tensor {name!r} has {n_nan} NaN and {n_inf} Inf value(s)")
    for name in ("reference_std", "target_std"):
        n_neg = int((tensors[name] < 0).sum())
        if n_neg:
            raise FixTableError(f"{where}: tensor {name!r} has {n_neg} negative standard deviation(s)")
    if ("adapter_weight" in tensors) != ("adapter_bias" in tensors):
        raise FixTableError(f"{where}: 'adapter_weight' and 'adapter_bias' must be stored together")


def _write_bytes(fh: BinaryIO, data: bytes) -> None:
    """Write ``data`` in chunks (a separate function so tests can simulate a failure midway)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start:start + _CHUNK])


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_fix_table(table: FixTable, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate ``table`` and write it atomically to ``path`` (a ``.safetensors`` file).

    Refuses to replace an existing file unless ``overwrite=True``. On any failure the destination is
    left as it was and no temporary file remains. Returns the path written.
    """
    from safetensors.torch import save as st_save

    dest = Path(path)
    table.validate(where=f"fix table for {dest}")
    if dest.exists() and not overwrite:
        raise FixTableError(f"{dest} already exists; pass overwrite=True (or choose another file name) to replace it")
    if not dest.parent.is_dir():
        raise FixTableError(f"cannot write {dest}: directory {dest.parent} does not exist")
    metadata = {"format": FORMAT, "version": VERSION, **table.meta.to_strings()}
    data = st_save({k: v.contiguous() for k, v in table.tensors().items()}, metadata=metadata)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_bytes(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return dest


def load_fix_table(path: str | os.PathLike) -> FixTable:
    """Read and validate a fix table; raises :class:`FixTableError` naming the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    src = Path(path)
    where = f"fix table {src}"
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise FixTableError(f"{where}: cannot read file ({exc.strerror or exc})") from None
    header, _ = read_header(io.BytesIO(data), len(data), where, FixTableError)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FixTableError(f"{where}: safetensors metadata must map strings to strings")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise FixTableError(f"{where}: unknown format {fmt!r}, expected {FORMAT!r} (is this a fix table?)")
    version = meta.get("version", "")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise FixTableError(f"{where}: invalid version {version!r}") from None
    if major > SUPPORTED_MAJOR:
        raise FixTableError(f"{where}: format version {version} is newer than this pack supports "
                            f"(major {SUPPORTED_MAJOR}); update Z-Image DimFix to read it")
    if major < 1:
        raise FixTableError(f"{where}: invalid version {version!r}")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise FixTableError(f"{where}: corrupt safetensors data ({exc})") from None
    _validate_tensors(tensors, where)
    table = FixTable(**{n: tensors[n] for n in REQUIRED_TENSORS},
                     extras={k: v for k, v in tensors.items() if k not in REQUIRED_TENSORS},
                     meta=FixTableMeta.from_strings(meta, where))
    return table.validate(where)
