"""Registered conv layers: one file per layer in a directory, shared by every replica.

A layer is quantized OIHW weights (a featcodec bitstream), an optional bias and
the convolution attributes. Each is stored as ``<name>.fcl``, a single file
(little-endian; no pickle anywhere)::

    offset  size  field
    0       8     magic b"\\x89FCL\\r\\n\\x1a\\n"
    8       2     format version (1)
    10      2     reserved, 0
    12      4     n: length of the metadata
    16      4     CRC-32 of the metadata
    20      n     metadata: a UTF-8 JSON object (attributes, bias, weights' length and SHA-256)
    20 + n  m     the weight bitstream, exactly as stored by codec.encode_qtensor (own CRC)

The metadata (version 1)::

    {"created": "2026-11-25T21:30:00.123Z", "stride": [1, 1], "padding": [1, 1, 1, 1],
     "dilation": [1, 1], "groups": 1,
     "bias": null | {"dtype": "int32" | "float32", "data": "<base64 of little-endian bytes>"},
     "weights": {"bytes": m, "sha256": "<hex>"}}

The layer's name is its file name (``<name>.fcl``), so a file copied under
another name is that layer too.

Writes are atomic: the file is written under a temporary name (a dot file,
never listed) in the same directory, fsynced, renamed over the final name with
``os.replace`` and the directory is fsynced; a crash leaves either the old file
or the new one, plus at worst a stray temporary file, removed once it is an
hour old. A file that fails any check (magic, version, lengths, metadata CRC,
JSON, SHA-256, the bitstream's own CRC, the layer's consistency) is *corrupt*:
it is reported (:class:`CorruptLayer`, logged once per file version), never
served, and can be replaced or deleted.

Every process caches parsed layers in memory, keyed by name and checked on
each use against the file's ``stat`` (device, inode, size, mtime and ctime in
ns): a replacement or a deletion by another replica is seen at the next use.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import codec
from codec.qconv import check_weights, conv_geometry
from codec.qtensor import QTensor

log = logging.getLogger("featcodec.service")

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)
SUFFIX = ".fcl"
TMP_SUFFIX = ".tmp"
MAGIC = b"\x89FCL\r\n\x1a\n"
VERSION = 1
_HEADER = struct.Struct("<8sHHII")  # magic, version, reserved, metadata length, CRC-32
_META_KEYS = frozenset({"created", "stride", "padding", "dilation", "groups", "bias", "weights"})
_BIAS_DTYPES = {"int32": np.dtype("<i4"), "float32": np.dtype("<f4")}
STALE_TMP_S = 3600.0  # temporary files older than this are debris of a crashed writer
# room for the description and the parsed metadata, counted against the cache budget
_ENTRY_OVERHEAD = 4096


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (single-threaded then): os.umask is process-wide and not atomic.
FILE_MODE = 0o666 & ~_read_umask()


def default_layers_dir() -> Path:
    """``featcodec/layers`` under the platform's user data directory.

    ``$XDG_DATA_HOME`` (default ``~/.local/share``) on Linux and other Unix systems,
    ``~/Library/Application Support`` on macOS, ``%LOCALAPPDATA%`` on Windows.
    """
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA", "")
        base = Path(local) if local else Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "featcodec" / "layers"


class InvalidName(ValueError):
    """A layer name outside ``NAME_PATTERN`` (or ``.``/``..``)."""


class InvalidLayer(ValueError):
    """Weights, bias or attributes that do not make a layer."""


class LayerNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no layer named {name!r}")
        self.name = name


class CorruptLayer(Exception):
    """A layer file that fails its checks; it is never served."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"layer {name!r} is stored corrupt ({reason}); replace it (PUT) or "
                         "delete it (DELETE)")
        self.name = name
        self.reason = reason


class StorageError(Exception):
    """The layers directory could not be read or written (permissions, disk full, I/O)."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in (".", ".."):
        shown = name if isinstance(name, str) and len(name) <= 40 else f"{str(name)[:40]}..."
        raise InvalidName(f"invalid layer name {shown!r}: use 1 to 128 ASCII letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Attributes:
    """Normalized convolution attributes (padding: top, left, bottom, right)."""

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int


def check_layer(w: QTensor, bias: np.ndarray | None, stride: Any = 1, padding: Any = 0,
                dilation: Any = 1, groups: Any = 1) -> Attributes:
    """Validate a layer (what qconv2d would refuse for any input); normalized attributes.

    Raises :class:`InvalidLayer` (a ValueError) with the reason.
    """
    try:
        check_weights(w)
        if w.codes.ndim != 4:
            raise ValueError(f"w must be 4-D OIHW, got shape {w.shape}")
        if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)):
            raise TypeError(f"groups must be an integer, not {type(groups).__name__}")
        o, cg, kh, kw = w.shape
        # shapes only: any input size the kernel fits validates the attributes
        big = 2**40
        g = conv_geometry((1, cg * int(groups), big, big), w.shape, stride, padding, dilation,
                          groups)
        if bias is not None:
            if not isinstance(bias, np.ndarray) or bias.dtype not in (np.int32, np.float32):
                raise TypeError("bias must be an int32 or float32 array")
            if bias.shape != (o,):
                raise ValueError(f"bias must have shape ({o},) (one per output channel), "
                                 f"got {bias.shape}")
            if bias.dtype == np.float32 and not np.isfinite(bias).all():
                raise ValueError("bias must be finite")
    except (TypeError, ValueError) as exc:
        raise InvalidLayer(str(exc)) from None
    return Attributes(g.stride, g.padding, g.dilation, g.groups)


@dataclass(frozen=True, eq=False)
class Layer:
    """A parsed, validated layer; ``weights.codes`` and ``bias`` are read-only."""

    name: str
    weights: QTensor
    bias: np.ndarray | None
    attrs: Attributes
    created: str
    sha256: str
    weights_bytes: int
    file_bytes: int

    @property
    def nbytes(self) -> int:
        return (self.weights.codes.nbytes + (0 if self.bias is None else self.bias.nbytes)
                + _ENTRY_OVERHEAD)

    def describe(self) -> dict[str, Any]:
        w = self.weights
        o, cg, kh, kw = w.shape
        return {
            "name": self.name,
            "weight_shape": [o, cg, kh, kw],
            "in_channels": cg * self.attrs.groups,
            "out_channels": o,
            "kernel": [kh, kw],
            "method": w.method,
            "bits": w.bits,
            "signed": w.signed,
            "per_channel": w.axis is not None,
            "stride": list(self.attrs.stride),
            "padding": list(self.attrs.padding),
            "dilation": list(self.attrs.dilation),
            "groups": self.attrs.groups,
            "bias": None if self.bias is None else self.bias.dtype.name,
            "created": self.created,
            "sha256": self.sha256,
            "weights_bytes": self.weights_bytes,
            "file_bytes": self.file_bytes,
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_file(weights_blob: bytes, bias: np.ndarray | None, attrs: Attributes,
                created: str) -> bytes:
    """The file's bytes (see the module docstring)."""
    bias_meta = None
    if bias is not None:
        le = np.ascontiguousarray(bias, dtype=_BIAS_DTYPES[bias.dtype.name])
        bias_meta = {"dtype": bias.dtype.name, "data": base64.b64encode(le.tobytes()).decode()}
    meta = {"created": created, "stride": list(attrs.stride), "padding": list(attrs.padding),
            "dilation": list(attrs.dilation), "groups": attrs.groups, "bias": bias_meta,
            "weights": {"bytes": len(weights_blob),
                        "sha256": hashlib.sha256(weights_blob).hexdigest()}}
    text = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    header = _HEADER.pack(MAGIC, VERSION, 0, len(text), zlib.crc32(text))
    return header + text + bytes(weights_blob)


class _Corrupt(Exception):
    pass


def _ints(value: Any, size: int, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) != size or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _Corrupt(f"metadata {what} must be a list of {size} integers")
    return value


def _parse(name: str, data: bytes) -> Layer:
    if len(data) < _HEADER.size:
        raise _Corrupt(f"truncated: {len(data)} bytes, shorter than the header")
    magic, version, _, n, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _Corrupt("not a featcodec layer file (bad magic)")
    if version != VERSION:
        raise _Corrupt(f"layer file format version {version}; this server reads {VERSION}")
    end = _HEADER.size + n
    if len(data) < end:
        raise _Corrupt("truncated inside the metadata")
    text = data[_HEADER.size:end]
    if zlib.crc32(text) != crc:
        raise _Corrupt("metadata CRC-32 mismatch")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise _Corrupt(f"metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise _Corrupt("metadata does not have the expected keys")
    stride = _ints(meta["stride"], 2, "stride")
    padding = _ints(meta["padding"], 4, "padding")
    dilation = _ints(meta["dilation"], 2, "dilation")
    groups = meta["groups"]
    created = meta["created"]
    wmeta = meta["weights"]
    if not isinstance(groups, int) or isinstance(groups, bool) or not isinstance(created, str):
        raise _Corrupt("metadata groups or created has the wrong type")
    if not isinstance(wmeta, dict) or not isinstance(wmeta.get("bytes"), int) \
            or not isinstance(wmeta.get("sha256"), str):
        raise _Corrupt("metadata weights entry is malformed")
    blob = data[end:]
    if len(blob) != wmeta["bytes"]:
        raise _Corrupt(f"weights are {len(blob)} bytes, the metadata says {wmeta['bytes']} "
                       "(truncated or appended to)")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != wmeta["sha256"]:
        raise _Corrupt("weights SHA-256 mismatch")
    try:
        w = codec.decode_qtensor(blob)
    except (TypeError, ValueError) as exc:
        raise _Corrupt(f"weight bitstream: {exc}") from None
    bias = None
    if meta["bias"] is not None:
        b = meta["bias"]
        if not isinstance(b, dict) or set(b) != {"dtype", "data"} \
                or b["dtype"] not in _BIAS_DTYPES or not isinstance(b["data"], str):
            raise _Corrupt("metadata bias entry is malformed")
        try:
            raw = base64.b64decode(b["data"], validate=True)
        except ValueError:
            raise _Corrupt("metadata bias is not base64") from None
        le = _BIAS_DTYPES[b["dtype"]]
        if len(raw) % le.itemsize:
            raise _Corrupt("metadata bias has a partial element")
        bias = np.frombuffer(raw, le).astype(np.dtype(b["dtype"]))
        bias.flags.writeable = False
    try:
        attrs = check_layer(w, bias, stride, padding, dilation, groups)
    except InvalidLayer as exc:
        raise _Corrupt(f"not a valid layer: {exc}") from None
    w.codes.flags.writeable = False
    return Layer(name, w, bias, attrs, created, digest, len(blob), len(data))


def parse_file(name: str, data: bytes) -> Layer:
    """A layer from a file's bytes; :class:`CorruptLayer` if any check fails."""
    try:
        return _parse(name, data)
    except _Corrupt as exc:
        raise CorruptLayer(name, str(exc)) from None


_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is atomic
    finally:
        os.close(fd)


def _storage_error(action: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {action}: {exc.strerror or exc}")


class LayerStore:
    """The layers in ``directory``, with a per-process cache of parsed layers.

    Thread-safe. ``cache_bytes`` bounds the cache (codes, bias and a fixed
    overhead per layer, least recently used evicted first); ``on_corrupt(name,
    reason)`` is called once per corrupt file version found.
    """

    def __init__(self, directory: Path | str, cache_bytes: int = 256 * 2**20,
                 on_corrupt: Callable[[str, str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.cache_bytes = cache_bytes
        self.on_corrupt = on_corrupt
        self._cache: OrderedDict[str, tuple[_StatKey, Layer | str]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.directory / (validate_name(name) + SUFFIX)

    # ---- cache

    def _cached(self, name: str, key: _StatKey) -> Layer | str | None:
        with self._lock:
            hit = self._cache.get(name)
            if hit is None or hit[0] != key:
                return None
            self._cache.move_to_end(name)
            return hit[1]

    def _remember(self, name: str, key: _StatKey, value: Layer | str) -> None:
        size = value.nbytes if isinstance(value, Layer) else _ENTRY_OVERHEAD
        with self._lock:
            self._forget_locked(name)
            if size > self.cache_bytes:
                return
            self._cache[name] = (key, value)
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                old, _ = next(iter(self._cache.items()))
                self._forget_locked(old)

    def _forget_locked(self, name: str) -> None:
        entry = self._cache.pop(name, None)
        if entry is not None:
            value = entry[1]
            self._cached_bytes -= value.nbytes if isinstance(value, Layer) else _ENTRY_OVERHEAD

    def forget(self, name: str) -> None:
        with self._lock:
            self._forget_locked(name)

    def cached_names(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    # ---- reads

    def get(self, name: str) -> Layer:
        """The layer ``name``: from the cache while the file is unchanged, else read anew.

        Raises LayerNotFound, CorruptLayer, StorageError (and InvalidName).
        """
        path = self.path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.forget(name)
            raise LayerNotFound(name) from None
        except OSError as exc:
            raise _storage_error(f"read layer {name!r}", exc) from None
        hit = self._cached(name, _stat_key(st))
        if hit is None:
            hit = self._load(name, path)
        if isinstance(hit, str):
            raise CorruptLayer(name, hit)
        return hit

    def _load(self, name: str, path: Path) -> Layer | str:
        try:
            with open(path, "rb") as f:
                key = _stat_key(os.fstat(f.fileno()))  # the version we actually read
                data = f.read()
        except FileNotFoundError:
            self.forget(name)
            raise LayerNotFound(name) from None
        except OSError as exc:
            raise _storage_error(f"read layer {name!r}", exc) from None
        if len(data) != key[2]:  # changed while we read: the next use reads it again
            key = (key[0], key[1], -1, key[3], key[4])
        value: Layer | str
        try:
            value = parse_file(name, data)
        except CorruptLayer as exc:
            value = exc.reason
            log.error("corrupt layer file %s: %s; it is not served (replace it with PUT "
                      "/v1/layers/%s or remove it with DELETE)", path, exc.reason, name)
            if self.on_corrupt is not None:
                self.on_corrupt(name, exc.reason)
        self._remember(name, key, value)
        return value

    def list(self) -> tuple[list[Layer], list[str]]:
        """Every valid layer and the names of corrupt ones, each sorted by name."""
        try:
            with os.scandir(self.directory) as it:
                names = sorted(e.name[:-len(SUFFIX)] for e in it
                               if e.name.endswith(SUFFIX) and not e.name.startswith("."))
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise _storage_error("list the layers directory", exc) from None
        layers: list[Layer] = []
        corrupt: list[str] = []
        for name in names:
            try:
                layers.append(self.get(name))
            except InvalidName:
                continue  # a file the service did not write (no layer has that name)
            except LayerNotFound:
                continue  # deleted since the listing
            except CorruptLayer:
                corrupt.append(name)
        present = set(names)
        for name in self.cached_names():
            if name not in present:
                self.forget(name)
        return layers, corrupt

    # ---- writes

    def put(self, name: str, weights: QTensor, weights_blob: bytes,
            bias: np.ndarray | None = None, stride: Any = 1, padding: Any = 0,
            dilation: Any = 1, groups: Any = 1) -> tuple[Layer, bool]:
        """Validate and store a layer (atomically); the stored layer and whether one was
        replaced. ``weights`` must be ``codec.decode_qtensor(weights_blob)``.

        Raises InvalidName, InvalidLayer, StorageError.
        """
        path = self.path(name)
        attrs = check_layer(weights, bias, stride, padding, dilation, groups)
        if bias is not None:
            bias = np.array(bias, dtype=bias.dtype.newbyteorder("="))
            bias.flags.writeable = False
        created = _now()
        data = encode_file(weights_blob, bias, attrs, created)
        try:
            replaced = self._write_atomic(name, path, data)
        except OSError as exc:
            raise _storage_error(f"store layer {name!r}", exc) from None
        self.forget(name)  # the next use reads the file: another replica may write it too
        layer = Layer(name, weights, bias, attrs, created, hashlib.sha256(weights_blob).hexdigest(),
                      len(weights_blob), len(data))
        return layer, replaced

    def _write_atomic(self, name: str, path: Path, data: bytes) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sweep_temporaries()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=self.directory)
        try:
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; give the usual mode
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            replaced = path.exists()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.directory)
        return replaced

    def delete(self, name: str) -> None:
        """Remove the layer's file (whatever its state). Raises LayerNotFound, StorageError."""
        path = self.path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            self.forget(name)
            raise LayerNotFound(name) from None
        except OSError as exc:
            raise _storage_error(f"delete layer {name!r}", exc) from None
        self.forget(name)
        _fsync_dir(self.directory)

    def sweep_temporaries(self, older_than: float = STALE_TMP_S) -> int:
        """Remove temporary files left by crashed writers; how many were removed."""
        removed = 0
        cutoff = time.time() - older_than
        try:
            with os.scandir(self.directory) as it:
                candidates = [e for e in it
                              if e.name.startswith(".") and e.name.endswith(TMP_SUFFIX)]
        except OSError:
            return 0
        for entry in candidates:
            with contextlib.suppress(OSError):  # e.g. renamed into place meanwhile
                if entry.is_file(follow_symlinks=False) \
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed
