"""app/layers.py: the layer file format, atomic writes, corruption, the per-process cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import codec
from app import layers
from app.layers import (CorruptLayer, InvalidLayer, InvalidName, LayerNotFound, LayerStore,
                        StorageError)

RNG = np.random.default_rng(3)
W_FLOAT = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)


def weights(seed: int = 0, shape: tuple[int, ...] = (8, 4, 3, 3)) -> tuple[Any, bytes]:
    wf = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    q = codec.quantize(wf, "symmetric", 8, axis=0, signed=True, restricted=True)
    blob = codec.encode_qtensor(q, restricted=True)
    return codec.decode_qtensor(blob), blob


def put(store: LayerStore, name: str = "conv1", seed: int = 0, **kw: Any) -> Any:
    w, blob = weights(seed)
    return store.put(name, w, blob, **kw)


@pytest.fixture()
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "layers")


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "conv1", "A.b-c_d", "0", "x" * 128, "resnet.layer1.0",
                                  "a..b", "a."])
def test_valid_names(name: str) -> None:
    assert layers.validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "..\\x", "a/b", "/abs", "x" * 129,
                                  "-a", "_a", ".hidden", "é", "a b", "a\n", "a\x00b", "a:b",
                                  "ａ", "a/../b", "conv1\n"])
def test_invalid_names(name: str, store: LayerStore) -> None:
    with pytest.raises(InvalidName):
        layers.validate_name(name)
    with pytest.raises(InvalidName):
        put(store, name)
    with pytest.raises(InvalidName):
        store.get(name)
    with pytest.raises(InvalidName):
        store.delete(name)
    assert not store.directory.exists() or visible(store.directory) == []


# --- round trip and format -----------------------------------------------------------------


def test_put_get_round_trip(store: LayerStore) -> None:
    w, blob = weights()
    bias = np.arange(8, dtype=np.int32) - 4
    layer, replaced = store.put("conv1", w, blob, bias, stride=2, padding=[1, 2], dilation=1,
                                groups=1)
    assert not replaced
    got = LayerStore(store.directory).get("conv1")  # a fresh process: read from disk
    assert np.array_equal(got.weights.codes, w.codes)
    assert np.array_equal(got.weights.scale, w.scale) and got.weights.axis == 0
    assert got.bias is not None and got.bias.dtype == np.int32
    assert np.array_equal(got.bias, bias)
    d = got.describe()
    assert d == layer.describe()
    assert d["weight_shape"] == [8, 4, 3, 3] and d["in_channels"] == 4
    assert d["stride"] == [2, 2] and d["padding"] == [1, 2, 1, 2] and d["dilation"] == [1, 1]
    assert d["groups"] == 1 and d["bias"] == "int32" and d["bits"] == 8 and d["per_channel"]
    assert d["sha256"] == hashlib.sha256(blob).hexdigest() and d["weights_bytes"] == len(blob)
    assert d["file_bytes"] == (store.directory / "conv1.fcl").stat().st_size
    assert d["created"].endswith("Z")
    assert not got.weights.codes.flags.writeable and not got.bias.flags.writeable


def test_float_bias_kept_exactly(store: LayerStore) -> None:
    bias = np.array([0.1, -2.5, 1e-7, 3e5, 0, -0.0, 7, 1 / 3], np.float32)
    put(store, bias=bias.astype(">f4").astype(np.float32))
    got = LayerStore(store.directory).get("conv1")
    assert got.bias is not None and got.bias.dtype == np.float32
    assert got.bias.tobytes() == bias.tobytes()


def test_file_format_is_header_json_bitstream(store: LayerStore) -> None:
    w, blob = weights()
    store.put("conv1", w, blob, np.ones(8, np.float32), padding=1)
    data = (store.directory / "conv1.fcl").read_bytes()
    magic, version, reserved, n, crc = struct.unpack_from("<8sHHII", data)
    assert magic == b"\x89FCL\r\n\x1a\n" and version == 1 and reserved == 0
    text = data[20:20 + n]
    assert zlib.crc32(text) == crc
    meta = json.loads(text)
    assert meta["padding"] == [1, 1, 1, 1] and meta["bias"]["dtype"] == "float32"
    assert meta["weights"] == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    assert data[20 + n:] == blob  # the weights bitstream, byte for byte
    assert b"pickle" not in data and not data.startswith(b"\x80")


def test_replace_reports_replaced(store: LayerStore) -> None:
    assert put(store, seed=0)[1] is False
    layer, replaced = put(store, seed=1)
    assert replaced is True
    assert store.get("conv1").sha256 == layer.sha256
    assert visible(store.directory) == ["conv1.fcl"]


def test_list_and_delete(store: LayerStore) -> None:
    assert store.list() == ([], [])  # the directory does not exist yet
    for name in ("b", "a", "c"):
        put(store, name)
    (store.directory / "notes.txt").write_text("ignored")
    (store.directory / "-bad.fcl").write_bytes(b"not a layer name")
    found, corrupt = store.list()
    assert [x.name for x in found] == ["a", "b", "c"] and corrupt == []
    store.delete("b")
    assert [x.name for x in store.list()[0]] == ["a", "c"]
    with pytest.raises(LayerNotFound):
        store.get("b")
    with pytest.raises(LayerNotFound):
        store.delete("b")


@pytest.mark.parametrize(("kw", "match"), [
    ({"groups": 3}, "divisible"),
    ({"groups": 0}, "groups"),
    ({"groups": True}, "groups"),
    ({"stride": 0}, "stride"),
    ({"padding": -1}, "padding"),
    ({"dilation": [1, 2, 3]}, "dilation"),
    ({"bias": np.zeros(7, np.float32)}, "shape"),
    ({"bias": np.zeros(8, np.float64)}, "int32 or float32"),
    ({"bias": np.array([np.nan] * 8, np.float32)}, "finite"),
])
def test_invalid_layers(store: LayerStore, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidLayer, match=match):
        put(store, **kw)
    assert not store.directory.exists() or visible(store.directory) == []


def test_non_linear_or_non_4d_weights(store: LayerStore) -> None:
    q = codec.decode_qtensor(codec.encode(W_FLOAT, "mulaw", 8))
    with pytest.raises(InvalidLayer, match="method"):
        store.put("m", q, codec.encode_qtensor(q))
    q2 = codec.decode_qtensor(codec.encode(W_FLOAT.reshape(8, 36), "symmetric", 8, axis=0))
    with pytest.raises(InvalidLayer, match="4-D"):
        store.put("m", q2, codec.encode_qtensor(q2))


def test_default_layers_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if os.name == "nt":
        pytest.skip("POSIX layout")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    d = layers.default_layers_dir()
    if d.parts[-2:] == ("featcodec", "layers") and "Library" not in d.parts:
        assert d == tmp_path / "featcodec" / "layers"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert "relative" not in str(layers.default_layers_dir())


def test_settings_layers_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings
    monkeypatch.setenv("FEATCODEC_LAYERS_DIR", "")
    assert Settings().layers_dir is None
    monkeypatch.setenv("FEATCODEC_LAYERS_DIR", "/data/layers")
    assert Settings().layers_dir == Path("/data/layers")
    monkeypatch.setenv("FEATCODEC_CONV_BACKEND", "numpy")
    assert Settings().conv_backend == "numpy"


# --- atomic writes -------------------------------------------------------------------------


@pytest.mark.parametrize("fail", ["replace", "fsync", "write"])
def test_crash_during_write_keeps_the_old_version(store: LayerStore, fail: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    old, _ = put(store, seed=0)
    before = (store.directory / "conv1.fcl").read_bytes()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    if fail == "write":  # a partial write, then the crash
        real_write = os.write

        def partial(fd: int, data: Any) -> int:
            real_write(fd, bytes(data[:100]))
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "write", partial)
    else:
        monkeypatch.setattr(os, fail, boom)
    with pytest.raises(StorageError, match="cannot store layer"):
        put(store, seed=1)
    monkeypatch.undo()
    assert visible(store.directory) == ["conv1.fcl"]  # no temporary file left behind
    assert (store.directory / "conv1.fcl").read_bytes() == before
    assert LayerStore(store.directory).get("conv1").sha256 == old.sha256
    assert store.get("conv1").sha256 == old.sha256


def test_leftover_temporary_files_are_ignored_and_swept(store: LayerStore) -> None:
    put(store, "a")
    # what a writer killed mid-write (no chance to clean up) leaves behind
    w, blob = weights(1)
    partial = layers.encode_file(blob, None, layers.check_layer(w, None), "now")[:50]
    stale = store.directory / ".a.k3j4.tmp"
    fresh = store.directory / ".b.x9y8.tmp"
    stale.write_bytes(partial)
    fresh.write_bytes(partial)
    old = time.time() - 2 * layers.STALE_TMP_S
    os.utime(stale, (old, old))
    assert [x.name for x in store.list()[0]] == ["a"] and store.list()[1] == []
    with pytest.raises(LayerNotFound):
        store.get("b")
    put(store, "c")  # writes sweep old temporary files, not fresh ones (a writer may own them)
    assert visible(store.directory) == [".b.x9y8.tmp", "a.fcl", "c.fcl"]


def test_concurrent_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    writer, reader = LayerStore(tmp_path), LayerStore(tmp_path)
    versions = {put(writer, seed=s)[0].sha256 for s in (0, 1)}
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[str] = set()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(reader.get("conv1").sha256)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
                return

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            put(writer, seed=i % 2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and seen <= versions and seen


def test_storage_errors(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    s = LayerStore(not_a_dir)
    with pytest.raises(StorageError):
        put(s)
    with pytest.raises(StorageError):
        s.get("conv1")
    with pytest.raises(StorageError):
        s.list()


# --- corruption ----------------------------------------------------------------------------


def _rewrite(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    n = struct.unpack_from("<I", data, 12)[0]
    if how == "flip-weights":
        data[-5] ^= 0x40
    elif how == "flip-json":
        data[25] ^= 0x01
    elif how == "truncate":
        del data[-10:]
    elif how == "truncate-header":
        del data[12:]
    elif how == "append":
        data += b"\x00"
    elif how == "magic":
        data[0:8] = b"PK\x03\x04abcd"
    elif how == "version":
        data[8] = 9
    elif how == "empty":
        data = bytearray()
    elif how in ("not-json", "bad-bias", "bad-groups", "weights-crc"):
        meta = json.loads(bytes(data[20:20 + n]))
        blob = bytes(data[20 + n:])
        text = json.dumps(meta).encode()
        if how == "not-json":
            text = b"{not json"
        elif how == "bad-bias":
            meta["bias"] = {"dtype": "float32", "data": "AAAA"}
            text = json.dumps(meta).encode()
        elif how == "bad-groups":
            meta["groups"] = 3
            text = json.dumps(meta).encode()
        else:  # consistent metadata around a bitstream whose own CRC fails
            b = bytearray(blob)
            b[-1] ^= 0xFF
            blob = bytes(b)
            meta["weights"]["sha256"] = hashlib.sha256(blob).hexdigest()
            text = json.dumps(meta).encode()
        data = bytearray(struct.pack("<8sHHII", bytes(data[:8]), 1, 0, len(text),
                                     zlib.crc32(text)) + text + blob)
    path.write_bytes(bytes(data))


CORRUPTIONS = ["flip-weights", "flip-json", "truncate", "truncate-header", "append", "magic",
               "version", "empty", "not-json", "bad-bias", "bad-groups", "weights-crc"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_files_are_reported_not_served(tmp_path: Path, how: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    found: list[tuple[str, str]] = []
    store = LayerStore(tmp_path, on_corrupt=lambda n, r: found.append((n, r)))
    put(store, "conv1", bias=np.ones(8, np.float32))
    put(store, "good")
    store.get("conv1")  # cached now: the change on disk must still be seen
    _rewrite(tmp_path / "conv1.fcl", how)
    with caplog.at_level(logging.ERROR, logger="featcodec.service"):
        for _ in range(3):
            with pytest.raises(CorruptLayer) as info:
                store.get("conv1")
    assert info.value.name == "conv1" and info.value.reason
    assert "corrupt" in str(info.value)
    # logged and counted once per file version, not once per request
    assert len(found) == 1 and len([r for r in caplog.records if "corrupt" in r.message]) == 1
    assert [x.name for x in store.list()[0]] == ["good"] and store.list()[1] == ["conv1"]
    # a corrupt layer can be replaced, or deleted
    put(store, "conv1", seed=5)
    assert store.get("conv1").sha256 == hashlib.sha256(weights(5)[1]).hexdigest()
    _rewrite(tmp_path / "conv1.fcl", how)
    store.delete("conv1")
    found_layers, corrupt = store.list()
    assert [x.name for x in found_layers] == ["good"] and corrupt == []


# --- the cache, and other replicas ---------------------------------------------------------


def test_cache_hits_and_changes_by_other_replicas(tmp_path: Path) -> None:
    a, b = LayerStore(tmp_path), LayerStore(tmp_path)
    put(a, seed=0)
    first = b.get("conv1")
    assert b.get("conv1") is first  # unchanged file: the same prepared object
    replaced = put(a, seed=1)[0]  # another replica replaces it
    second = b.get("conv1")
    assert second is not first and second.sha256 == replaced.sha256
    a.delete("conv1")  # another replica deletes it
    with pytest.raises(LayerNotFound):
        b.get("conv1")
    assert b.cached_names() == []


def test_cache_is_bounded(tmp_path: Path) -> None:
    w, blob = weights()
    per_layer = w.codes.nbytes + layers._ENTRY_OVERHEAD
    store = LayerStore(tmp_path, cache_bytes=2 * per_layer)
    for name in ("a", "b", "c"):
        store.put(name, w, blob)
        store.get(name)
    assert store.cached_names() == ["b", "c"]
    assert store.get("a").name == "a" and store.cached_names() == ["c", "a"]
    tiny = LayerStore(tmp_path, cache_bytes=0)
    assert tiny.get("a").name == "a" and tiny.cached_names() == []
