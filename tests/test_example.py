"""examples/split_ocr.py at small scale against a real server: the split is exact, and at
8 bits the detector downstream agrees with the uncompressed run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from conftest import ROOT, Server

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("rapidocr", reason="the example needs the 'example' extra")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def example() -> ModuleType:
    path = ROOT / "examples" / "split_ocr.py"
    spec = importlib.util.spec_from_file_location("split_ocr", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["split_ocr"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_model_ships_in_the_wheel_and_splits(example: ModuleType) -> None:
    model = example.locate_model()
    assert model.is_file() and "site-packages" in str(model)
    net = example.Network(model)
    split = net.split
    assert split.weight is not None and split.weight.ndim == 4
    assert split.bias is not None and split.bias.shape == (split.weight.shape[0],)
    assert split.after_conv is not None
    # head + tail is exactly the full network
    x = example.preprocess(example.synth_images(1, 128)[0])
    np.testing.assert_array_equal(net.run_tail(net.run_head(x)), net.run_full(x))
    # the first tail layer, computed here in float, hands over to the second tail exactly
    feats = net.run_head(x).astype(np.float64)
    w, b = split.weight.astype(np.float64), split.bias.astype(np.float64)
    assert split.attrs["groups"] == 1 and w.shape[2:] == (1, 1)  # a 1x1 conv
    y = np.maximum(np.einsum("oc,nchw->nohw", w[:, :, 0, 0], feats) + b[None, :, None, None], 0)
    np.testing.assert_allclose(net.run_tail_after_conv(y.astype(np.float32)), net.run_full(x),
                               atol=1e-4)


def test_detector_finds_the_synthetic_text(example: ModuleType) -> None:
    img = example.synth_images(1, 320, seed=1)[0]
    assert img.shape == (320, 320, 3) and img.dtype == np.uint8
    net = example.Network(example.locate_model())
    boxes = example.Detector().boxes(net.run_full(example.preprocess(img)))
    assert len(boxes) >= 5


def test_agreement_at_8_bits_against_the_server(example: ModuleType, server: Server) -> None:
    # conv=False: the layer/conv2d endpoints are tested once they exist on the server.
    result = example.run(server.url, methods=["linear", "mulaw", "exp"], bits=[8, 3],
                         n_images=2, size=320, conv=False, repeat=1)
    rows = result["rows"]
    assert [(r.method, r.bits) for r in rows] == [
        ("linear", 8), ("linear", 3), ("mulaw", 8), ("mulaw", 3), ("exp", 8), ("exp", 3)]
    assert result["ref_boxes"] >= 10
    for r in rows:
        assert r.path == "decompress" and r.layout == "per-channel"
        expected = result["feature_bytes"] / 4 * r.bits / 8
        assert expected < r.bytes_per_request < expected * 1.01  # header and params only
        assert r.latency_ms > 0
        if r.bits == 8:
            assert r.box_f1 >= 0.99, r
            assert r.map_iou >= 0.99, r
            assert r.map_mae < 1e-3, r
    table = example.markdown(result)
    assert table.startswith("| method | bits |")
    assert table.count("| decompress |") == len(rows)


def test_command_line(example: ModuleType, server: Server,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert example.main(["--server", server.url, "--images", "1", "--size", "128",
                         "--methods", "symmetric", "--bits", "8", "--axis", "none",
                         "--no-conv"]) == 0
    out = capsys.readouterr().out
    assert "| symmetric | 8 | per-tensor | decompress |" in out
    assert Path(ROOT / "examples" / "README.md").is_file()


def test_conv_on_the_codes_through_a_registered_layer(example: ModuleType,
                                                      tmp_path: Path) -> None:
    """The first tail layer runs on the server, on the codes themselves."""
    from conftest import serve

    gen = serve(FEATCODEC_OPEN_LAYER_WRITES="true", FEATCODEC_LAYERS_DIR=str(tmp_path))
    srv = next(gen)
    try:
        result = example.run(srv.url, methods=["linear"], bits=[8], n_images=2, size=320,
                             conv=True, repeat=1)
    finally:
        gen.close()
    conv_rows = [r for r in result["rows"] if r.path != "decompress"]
    assert conv_rows, [r.path for r in result["rows"]]
    for r in conv_rows:
        assert r.box_f1 >= 0.99 and r.map_iou >= 0.99, r
