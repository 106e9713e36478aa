#!/usr/bin/env python3
"""Split computing with a real pretrained network: PP-OCRv6 text detection.

The network is the DB text detector that ships inside the ``rapidocr`` wheel
(``rapidocr/models/PP-OCRv6_det_small.onnx``, loaded from site-packages, no
download). It is cut at an intermediate activation into a *head* (run here,
as on an edge device) and a *tail*. For each codec method and bit width the
head's features are encoded with ``codec.encode`` and sent through the running
featcodec service:

* decompress round trip: ``POST /v1/decompress`` gives the tensor back and the
  tail finishes inference on it;
* conv path (when the server has the layer endpoints): the tail's first layer
  (1x1 Conv + bias + ReLU) is stored with ``PUT /v1/layers/{name}`` and the
  server computes it directly on the codes (``POST /v1/layers/{name}/conv2d``);
  the rest of the tail runs on its output. Per-tensor linear codes only.

Each run is compared with the uncompressed run of the same network: box F1
(the detector's boxes, matched at IoU >= 0.5), IoU of the binarized detection
map (p > 0.3) and the mean absolute difference of the probability map.

    pip install -e '.[client,example]'
    python examples/split_ocr.py                       # starts a local server itself
    python examples/split_ocr.py --server http://127.0.0.1:8000 --images 8 --size 640

Images are synthesized (text rendered with Pillow's built-in font), so
nothing is fetched at run time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import codec
from codec.client import Client, NotFoundError, ServiceError

MODEL_DIST = "rapidocr"
MODEL_FILE = "rapidocr/models/PP-OCRv6_det_small.onnx"
LAYER_NAME = "split-ocr-first-tail-conv"
# rapidocr's own detection post-processing settings (rapidocr/config.yaml, Det:)
THRESH, BOX_THRESH, UNCLIP_RATIO = 0.3, 0.5, 1.6
IOU_MATCH = 0.5

_TEXT = ("featcodec split computing quantized feature maps travel compressed through the "
         "service while the tail network finishes inference invoice total amount due "
         "receipt order 2024 0123456789 ACME GmbH Straße café naïve €42.00 tel. +49")
WORDS = _TEXT.split()


# --------------------------------------------------------------------------- the model

def locate_model(path: str | None = None) -> Path:
    """The detector's ONNX file inside the installed rapidocr wheel."""
    if path:
        return Path(path)
    try:
        dist = importlib.metadata.distribution(MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("this example needs the rapidocr wheel: "
                         "pip install -e '.[example]'") from None
    model = Path(str(dist.locate_file(MODEL_FILE)))
    if not model.is_file():
        raise SystemExit(f"{MODEL_FILE} is not in rapidocr {dist.version}; pass --model")
    return model


@dataclass
class Split:
    """Where the network is cut, and the tail's first layer for the conv endpoint."""

    tensor: str                   # the activation that travels
    after_conv: str | None        # the first tail layer's output (post ReLU)
    weight: np.ndarray | None     # OIHW float32
    bias: np.ndarray | None       # (O,) float32
    attrs: dict[str, Any] = field(default_factory=dict)


def _chain(consumers: dict[str, list[Any]], tensor: str, ops: tuple[str, ...]) -> tuple[Any, str]:
    """Follow single consumers through Identity nodes to the next node; (node, its input)."""
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return None, tensor
        node = users[0]
        if node.op_type == "Identity":
            tensor = node.output[0]
            continue
        return (node if node.op_type in ops else None), tensor


def find_split(model: Any, name: str | None = None) -> Split:
    """A tensor that alone carries the head's result (every later node depends only on it)
    and that a ReLU produces, followed by Conv + bias + ReLU: the first tail layer."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[Any]] = {}
    producer: dict[str, Any] = {}
    last_use: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for t in node.input:
            if t and t not in inits:
                consumers.setdefault(t, []).append(node)
                last_use[t] = i
        for t in node.output:
            producer[t] = node
    for out in g.output:
        last_use[out.name] = len(g.node)
    graph_inputs = {i.name for i in g.input}

    def first_layer(tensor: str) -> Split | None:
        conv, _ = _chain(consumers, tensor, ("Conv",))
        if conv is None or conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2]):
            return None
        add, _ = _chain(consumers, conv.output[0], ("Add",))
        if add is None:
            return None
        bias_name = next((t for t in add.input if t in inits), None)
        relu, _ = _chain(consumers, add.output[0], ("Relu",))
        if bias_name is None or relu is None:
            return None
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        b = numpy_helper.to_array(inits[bias_name]).astype(np.float32).reshape(-1)
        if b.shape != (w.shape[0],):
            return None
        a = {k.name: helper.get_attribute_value(k) for k in conv.attribute}
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        pads = list(a.get("pads", [0, 0, 0, 0]))
        attrs = {"stride": list(a.get("strides", [1, 1])),
                 "dilation": list(a.get("dilations", [1, 1])),
                 "padding": pads[:4], "groups": int(a.get("group", 1))}
        return Split(tensor, relu.output[0], w, b, attrs)

    if name is not None:
        if name not in producer:
            raise SystemExit(f"no tensor {name!r} in the model")
        return first_layer(name) or Split(name, None, None, None)
    live: set[str] = set()
    for i, node in enumerate(g.node):
        live |= {t for t in node.output if t in last_use}
        live = {t for t in live if last_use[t] > i}
        if any(last_use.get(t, -1) > i for t in graph_inputs) or len(live) != 1:
            continue
        (tensor,) = live
        if producer[tensor].op_type == "Relu" and (split := first_layer(tensor)):
            return split
    raise SystemExit("found no single-tensor cut followed by Conv+bias+ReLU; pass --split")


class Network:
    """Full model, head, tail and tail-after-the-first-layer, on onnxruntime (CPU)."""

    def __init__(self, model_path: Path, split_name: str | None = None) -> None:
        import onnx
        import onnxruntime as ort
        from onnx.utils import Extractor

        model = onnx.load(str(model_path))
        self.split = find_split(model, split_name)
        self.input = model.graph.input[0].name
        self.output = model.graph.output[0].name
        extractor = Extractor(model)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3

        def session(m: Any) -> Any:
            return ort.InferenceSession(m.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])

        self.full = session(model)
        self.head = session(extractor.extract_model([self.input], [self.split.tensor]))
        self.tail = session(extractor.extract_model([self.split.tensor], [self.output]))
        self.tail2 = (session(extractor.extract_model([self.split.after_conv], [self.output]))
                      if self.split.after_conv else None)

    def run_full(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.full.run(None, {self.input: x})[0]
        return out

    def run_head(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.head.run(None, {self.input: x})[0]
        return out

    def run_tail(self, features: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.tail.run(None, {self.split.tensor: features})[0]
        return out

    def run_tail_after_conv(self, y: np.ndarray) -> np.ndarray:
        assert self.tail2 is not None and self.split.after_conv is not None
        out: np.ndarray = self.tail2.run(None, {self.split.after_conv: y})[0]
        return out


# --------------------------------------------------------------------------- data, task

def synth_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Documents-like RGB images: lines of text in several sizes, colours and backgrounds."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        base = rng.uniform(215, 255, 3)
        ramp = np.linspace(0, rng.uniform(-30, 10), size)[:, None, None]
        bg = np.clip(base + ramp + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        draw = ImageDraw.Draw(img)
        y = int(rng.integers(4, 16))
        while True:
            fs = int(rng.integers(max(9, size // 56), max(14, size // 16)))
            if y + fs + 4 > size:
                break
            font = ImageFont.load_default(size=fs)
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 6))))
            x = int(rng.integers(2, size // 3))
            if rng.random() < 0.2:  # white text on a dark band
                box = draw.textbbox((x, y), text, font=font)
                fill = tuple(int(v) for v in rng.integers(20, 120, 3))
                draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=fill)
                draw.text((x, y), text, fill=(250, 250, 250), font=font)
            else:
                ink = tuple(int(v) for v in rng.integers(0, 150, 3))
                draw.text((x, y), text, fill=ink, font=font)
            y += fs + int(rng.integers(fs // 3, fs + 8))
        images.append(np.asarray(img))
    return images


def preprocess(img: np.ndarray) -> np.ndarray:
    """rapidocr's detector input: (x/255 - 0.5)/0.5, NCHW; sides must be multiples of 32."""
    h, w = img.shape[:2]
    if h % 32 or w % 32:
        raise ValueError(f"image sides must be multiples of 32, got {h}x{w}")
    x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


class Detector:
    """rapidocr's own DB post-processing: probability map -> text boxes."""

    def __init__(self) -> None:
        from rapidocr.ch_ppocr_det.utils import DBPostProcess

        self.post = DBPostProcess(thresh=THRESH, box_thresh=BOX_THRESH,
                                  unclip_ratio=UNCLIP_RATIO, use_dilation=True)

    def boxes(self, prob: np.ndarray) -> np.ndarray:
        h, w = prob.shape[-2:]
        boxes, _ = self.post(prob, (h, w))
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    (ax0, ay0), (ax1, ay1) = a.min(0), a.max(0)
    (bx0, by0), (bx1, by1) = b.min(0), b.max(0)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return float(inter / union) if union > 0 else 0.0


def match_boxes(ref: np.ndarray, got: np.ndarray) -> int:
    """Greedy one-to-one matches at IoU >= 0.5 (of the boxes' bounding rectangles)."""
    pairs = sorted(((_iou(a, b), i, j) for i, a in enumerate(ref) for j, b in enumerate(got)),
                   reverse=True)
    used_r: set[int] = set()
    used_g: set[int] = set()
    for iou, i, j in pairs:
        if iou < IOU_MATCH:
            break
        if i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
    return len(used_r)


@dataclass
class Agreement:
    """Pooled over images: box matches and counts, map intersections and unions."""

    matched: int = 0
    n_ref: int = 0
    n_got: int = 0
    inter: int = 0
    union: int = 0
    abs_err: list[float] = field(default_factory=list)

    def add(self, ref_prob: np.ndarray, ref_boxes: np.ndarray, prob: np.ndarray,
            boxes: np.ndarray) -> None:
        self.matched += match_boxes(ref_boxes, boxes)
        self.n_ref += len(ref_boxes)
        self.n_got += len(boxes)
        a, b = ref_prob > THRESH, prob > THRESH
        self.inter += int(np.count_nonzero(a & b))
        self.union += int(np.count_nonzero(a | b))
        self.abs_err.append(float(np.mean(np.abs(prob - ref_prob))))

    @property
    def box_f1(self) -> float:
        total = self.n_ref + self.n_got
        return 2 * self.matched / total if total else 1.0

    @property
    def map_iou(self) -> float:
        return self.inter / self.union if self.union else 1.0

    @property
    def map_mae(self) -> float:
        return float(np.mean(self.abs_err)) if self.abs_err else 0.0


# --------------------------------------------------------------------------- experiment

@dataclass
class Row:
    method: str
    bits: int
    layout: str            # "per-channel" / "per-tensor"
    path: str              # "decompress" / "conv on codes"
    bytes_per_request: float
    ratio: float
    latency_ms: float
    box_f1: float
    map_iou: float
    map_mae: float


def _layer_endpoints(client: Client, net: Network, say: Any) -> bool:
    """Store the first tail layer; False (and why) when the server will not."""
    sp = net.split
    if sp.weight is None or net.tail2 is None:
        say("the split is not followed by Conv+bias+ReLU: conv rows skipped")
        return False
    try:
        client.put_layer(LAYER_NAME, sp.weight, sp.bias, stride=sp.attrs["stride"],
                         padding=sp.attrs["padding"], dilation=sp.attrs["dilation"],
                         groups=sp.attrs["groups"])
    except ServiceError as exc:
        if isinstance(exc, NotFoundError) or exc.status_code == 405:
            say("the server has no layer/conv2d endpoints: conv rows skipped")
        elif exc.status_code in (401, 403):
            say(f"the server refused to store the layer ({exc.status_code}: {exc.detail}); "
                "pass --api-key: conv rows skipped")
        else:
            raise
        return False
    return True


def run(server_url: str, methods: Sequence[str] | None = None,
        bits: Sequence[int] = (8, 4, 3, 2), n_images: int = 4, size: int = 640,
        axis: int | None = 1, conv: bool = True, model: str | None = None, seed: int = 0,
        repeat: int = 3, api_key: str | None = None, log: Any = None) -> dict[str, Any]:
    """Run the experiment; returns the rows and a few facts about the setup."""
    say = log or (lambda *a: None)
    methods = list(methods or [m["name"] for m in codec.methods()])
    net = Network(locate_model(model))
    det = Detector()
    images = synth_images(n_images, size, seed)
    inputs = [preprocess(im) for im in images]
    refs = []
    for x in inputs:
        prob = net.run_full(x)
        feats = net.run_head(x)
        split_err = float(np.max(np.abs(net.run_tail(feats) - prob)))
        if split_err > 1e-5:
            raise RuntimeError(f"head+tail differs from the full network by {split_err}")
        refs.append((feats, prob, det.boxes(prob)))
    feat_bytes = refs[0][0].nbytes
    say(f"split at {net.split.tensor!r}: features {refs[0][0].shape} float32, "
        f"{feat_bytes:,} B per image; {sum(len(r[2]) for r in refs)} reference boxes")
    rows: list[Row] = []
    with Client(server_url, api_key=api_key, timeout=120.0) as client:
        conv_ok = conv and _layer_endpoints(client, net, say)
        try:
            for method in methods:
                for b in bits:
                    rows.append(_measure(client, net, det, refs, method, b, axis, False,
                                         repeat))
                    say(_fmt_progress(rows[-1]))
            if conv_ok:
                for b in bits:
                    rows.append(_measure(client, net, det, refs, "linear", b, None, True,
                                         repeat))
                    say(_fmt_progress(rows[-1]))
        finally:
            if conv_ok:
                client.delete_layer(LAYER_NAME, missing_ok=True)
    return {"rows": rows, "split": net.split.tensor, "after_conv": net.split.after_conv,
            "feature_shape": list(refs[0][0].shape), "feature_bytes": feat_bytes,
            "image_bytes": int(images[0].nbytes), "images": n_images, "size": size,
            "ref_boxes": sum(len(r[2]) for r in refs), "model": MODEL_FILE,
            "rapidocr": importlib.metadata.version(MODEL_DIST)}


def _measure(client: Client, net: Network, det: Detector, refs: list[Any], method: str,
             bits: int, axis: int | None, conv: bool, repeat: int = 1) -> Row:
    """Bytes and agreement per image; latency is the median over images x ``repeat``."""
    agree = Agreement()
    sizes: list[int] = []
    latencies: list[float] = []
    for feats, ref_prob, ref_boxes in refs:
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            blob = codec.encode(feats, method, bits, axis)  # on the edge device
            if conv:
                y = client.layer_conv2d(LAYER_NAME, blob, relu=True)
            else:
                y = client.decompress(blob)
            latencies.append(time.perf_counter() - t0)
        assert isinstance(y, np.ndarray)
        prob = net.run_tail_after_conv(y) if conv else net.run_tail(y)
        sizes.append(len(blob))
        agree.add(ref_prob, ref_boxes, prob, det.boxes(prob))
    mean_size = float(np.mean(sizes))
    return Row(method, bits, "per-tensor" if axis is None else "per-channel",
               "conv on codes" if conv else "decompress", mean_size,
               refs[0][0].nbytes / mean_size, 1000 * statistics.median(latencies),
               agree.box_f1, agree.map_iou, agree.map_mae)


def _fmt_progress(r: Row) -> str:
    return (f"  {r.method:9} {r.bits} bits {r.path:13}: {r.bytes_per_request:,.0f} B, "
            f"box F1 {r.box_f1:.3f}, map IoU {r.map_iou:.4f}")


def markdown(result: dict[str, Any]) -> str:
    rows: list[Row] = result["rows"]
    lines = [
        ("| method | bits | layout | server does | bytes / request | ratio | round trip ms "
         "| box F1 | map IoU | map MAE |"),
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.method} | {r.bits} | {r.layout} | {r.path} | "
                     f"{r.bytes_per_request:,.0f} | {r.ratio:.2f}x | {r.latency_ms:.1f} | "
                     f"{100 * r.box_f1:.1f}% | {100 * r.map_iou:.2f}% | {r.map_mae:.5f} |")
    shape = "x".join(map(str, result["feature_shape"]))
    lines += [
        "",
        (f"{result['images']} synthetic {result['size']}x{result['size']} images, "
         f"{result['ref_boxes']} text boxes in the uncompressed run. Features: `{shape}` "
         f"float32 = {result['feature_bytes']:,} B per request uncompressed (the uint8 RGB "
         f"image is {result['image_bytes']:,} B). Model: `{result['model']}` from rapidocr "
         f"{result['rapidocr']}, split at `{result['split']}`."),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_server(api_key: str) -> Iterator[str]:
    """A ``featcodec serve`` subprocess on a free loopback port that accepts ``api_key``
    (which also allows it to store layers), stopped afterwards."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATCODEC_")}
    env["FEATCODEC_API_KEYS"] = api_key
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                                 "--log-level", "warning"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=Path(__file__).resolve().parents[1], env=env)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit("featcodec serve exited:\n"
                                     + log.read().decode(errors="replace"))
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("featcodec serve did not become ready in 60 s")
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="featcodec service URL (default: start a local one)")
    p.add_argument("--api-key", default=os.environ.get("FEATCODEC_API_KEY"),
                   help="bearer token for --server (default: $FEATCODEC_API_KEY); needed "
                        "to store the conv layer")
    p.add_argument("--images", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--size", type=int, default=640,
                   help="image side in pixels, a multiple of 32 (default 640)")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--bits", default="8,4,3,2", help="comma-separated bit widths")
    p.add_argument("--axis", default="1", help="channel axis for the decompress rows, or "
                                               "'none' for per-tensor (default 1)")
    p.add_argument("--no-conv", action="store_true", help="skip the conv-on-codes rows")
    p.add_argument("--model", help="another copy of the detector's ONNX file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3,
                   help="requests per image for the latency median (default 3)")
    args = p.parse_args(argv)
    kwargs: dict[str, Any] = {
        "methods": args.methods.split(",") if args.methods else None,
        "bits": [int(b) for b in args.bits.split(",")], "n_images": args.images,
        "size": args.size, "axis": None if args.axis.lower() == "none" else int(args.axis),
        "conv": not args.no_conv, "model": args.model, "seed": args.seed,
        "repeat": args.repeat,
        "log": lambda *a: print(*a, file=sys.stderr)}
    if args.server:
        result = run(args.server, api_key=args.api_key, **kwargs)
    else:
        key = secrets.token_urlsafe(24)
        with local_server(key) as url:
            result = run(url, api_key=key, **kwargs)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
