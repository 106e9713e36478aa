"""Registered conv layers: PUT, GET, list, DELETE, and conv2d with a stored layer.

Layers live in ``FEATCODEC_LAYERS_DIR`` (app/layers.py: file format, atomic
writes, the per-process cache). Registration and deletion need
``auth.require_layer_write``; every route needs the global API key when keys
are configured.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

import codec

from .. import auth, bodies, layers, metrics
from ..layers import CorruptLayer, InvalidLayer, InvalidName, Layer, LayerNotFound, LayerStore
from ..problems import InvalidParameters, ProblemError, UnsupportedMediaType, responses
from . import conv, offload, settings_of


class _AnyText(PathConvertor):
    """``{name:path}`` that also matches newlines (``.*`` does not), so that every name
    under /v1/layers/ reaches the handlers and their 422, never a bare 404."""

    regex = r"[\s\S]*"


register_url_convertor("layer", _AnyText())
router = APIRouter(prefix="/v1", tags=["layers"])

LAYER_KEYS = ("w", "bias", "stride", "padding", "dilation", "groups")
_CONV_QUERY = frozenset({"relu", "out_scale", "out_zero_point"})
_CONV_SUFFIX = "/conv2d"
_store_lock = threading.Lock()


class LayerNotFoundProblem(ProblemError):
    status, slug, title = 404, "layer-not-found", "Layer not found"


class CorruptLayerProblem(ProblemError):
    status, slug, title = 409, "corrupt-layer", "Corrupt layer"


class StorageUnavailable(ProblemError):
    status, slug, title = 503, "storage-unavailable", "Layer storage unavailable"


def store_of(app: Any) -> LayerStore:
    """The app's layer store, created on first use."""
    store: LayerStore | None = getattr(app.state, "layer_store", None)
    if store is None:
        with _store_lock:
            store = getattr(app.state, "layer_store", None)
            if store is None:
                settings = app.state.settings
                store = LayerStore(settings.layers_dir or layers.default_layers_dir(),
                                   cache_bytes=settings.layer_cache_bytes,
                                   on_corrupt=lambda name, reason: metrics.CORRUPT_LAYERS.inc())
                app.state.layer_store = store
    return store


def _checked_name(name: str) -> str:
    """The layer name of the path; 422 if invalid."""
    try:
        return layers.validate_name(name)
    except InvalidName as exc:
        raise InvalidParameters(str(exc)) from None


def _only_post_on_conv(name: str) -> None:
    """Route dependency (first): ``/v1/layers/NAME/conv2d`` takes POST only.

    ``{name:layer}`` lets the other methods' routes match that path with the name
    ``NAME/conv2d``; they answer 405 (``Allow: POST``) instead of an invalid name.
    """
    if name.endswith(_CONV_SUFFIX):
        try:
            layers.validate_name(name[:-len(_CONV_SUFFIX)])
        except InvalidName:
            return
        raise StarletteHTTPException(405, headers={"Allow": "POST"})


def _stored(func: Any, *args: Any) -> Any:
    """Call the store, turning its exceptions into problem documents."""
    try:
        return func(*args)
    except LayerNotFound as exc:
        raise LayerNotFoundProblem(str(exc)) from None
    except CorruptLayer as exc:
        raise CorruptLayerProblem(str(exc)) from None
    except (InvalidLayer, InvalidName) as exc:
        raise InvalidParameters(str(exc)) from None
    except layers.StorageError as exc:
        raise StorageUnavailable(str(exc)) from None


# --- models --------------------------------------------------------------------------------

_EXAMPLE = {
    "name": "resnet.layer1.0.conv1", "weight_shape": [64, 64, 3, 3], "in_channels": 64,
    "out_channels": 64, "kernel": [3, 3], "method": "symmetric", "bits": 8, "signed": True,
    "per_channel": True, "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1],
    "groups": 1, "bias": "float32", "created": "2026-11-25T21:30:00.123Z",
    "sha256": "9f2c…", "weights_bytes": 37161, "file_bytes": 37541}


class LayerInfo(BaseModel):
    """A stored layer. ``sha256`` and ``weights_bytes`` are those of the stored weight
    bitstream (what was sent, or the server's quantization of float weights)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]})

    name: str
    weight_shape: list[int]
    in_channels: int
    out_channels: int
    kernel: list[int]
    method: str
    bits: int
    signed: bool
    per_channel: bool
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    bias: str | None
    created: str
    sha256: str
    weights_bytes: int
    file_bytes: int


class LayerList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"layers": [_EXAMPLE], "corrupt": []}]})

    layers: list[LayerInfo]
    corrupt: list[str]


NameParam = Annotated[str, PathParam(description=f"the layer's name: {layers.NAME_PATTERN}, "
                                                  "not . or ..", examples=["conv1"])]
_LAYER_BODY_SCHEMA = {
    "type": "object", "description": "MessagePack map; binary fields are MessagePack bin",
    "required": ["w"],
    "properties": {"w": conv.WEIGHTS_SCHEMA, "bias": conv.BIAS_SCHEMA, **conv.ATTR_SCHEMAS},
}
_LAYER_BODY_EXAMPLE = {
    "w": {"dtype": "float32", "shape": [64, 64, 3, 3], "data": "<147456 bytes>"},
    "bias": {"dtype": "float32", "shape": [64], "data": "<256 bytes>"},
    "stride": 1, "padding": 1, "groups": 1}


# --- routes --------------------------------------------------------------------------------


def _list_job(store: LayerStore) -> dict[str, Any]:
    found, corrupt = _stored(store.list)
    return {"layers": [layer.describe() for layer in found], "corrupt": corrupt}


@router.get("/layers", response_model=LayerList, summary="List the stored layers",
            responses=responses(503))
async def list_layers(request: Request) -> dict[str, Any]:
    """Every stored layer, sorted by name; `corrupt` names files that fail their checks."""
    result: dict[str, Any] = await offload(_list_job, store_of(request.app))
    return result


def _put_job(store: LayerStore, name: str, body: bytes, max_elements: int) -> tuple[Layer, bool]:
    obj = conv.unpack_map(body, LAYER_KEYS, ("w",))
    w, blob = conv.weights_from(obj["w"], max_elements)
    bias = conv.bias_from(obj.get("bias"), max_elements)
    attrs = conv.attrs_from(obj)
    if blob is None:  # float weights, quantized by the server
        blob = codec.encode_qtensor(w, restricted=True)
    result: tuple[Layer, bool] = _stored(store.put, name, w, blob, bias, attrs["stride"],
                                         attrs["padding"], attrs["dilation"], attrs["groups"])
    return result


@router.put(
    "/layers/{name:layer}", summary="Store (or replace) a layer", status_code=201,
    response_model=LayerInfo,
    dependencies=[Depends(_only_post_on_conv), Depends(auth.require_layer_write)],
    openapi_extra={"requestBody": {"required": True, "content": {bodies.MSGPACK: {
        "schema": _LAYER_BODY_SCHEMA, "example": _LAYER_BODY_EXAMPLE}}}},
    responses={201: {"description": "stored as a new layer",
                     "headers": {"Location": {"description": "the layer's URL",
                                              "schema": {"type": "string"}}}},
               200: {"description": "replaced the layer of that name", "model": LayerInfo},
               **responses(400, 413, 415, 422, 503)},
)
async def put_layer(request: Request, name: NameParam) -> Response:
    """Validate and store a layer: 201 when new, 200 when it replaced one.

    `w` is a weight bitstream (stored byte for byte) or float weights (quantized
    per output channel, symmetric int8, and stored as that bitstream). A float
    bias is kept as float32 and converted with each request's activation scale.
    """
    name = _checked_name(name)
    kind = bodies.media_type(request.headers.get("content-type"))
    if kind not in bodies.MSGPACK_ALIASES:
        raise UnsupportedMediaType(f"send the layer as a MessagePack map ({bodies.MSGPACK}), "
                                   f"not {kind or 'no Content-Type'}")
    settings = settings_of(request)
    body = await bodies.read_body(request, settings.max_body_bytes)
    layer, replaced = await offload(_put_job, store_of(request.app), name, body,
                                    settings.max_elements)
    if replaced:
        return JSONResponse(layer.describe(), status_code=200)
    return JSONResponse(layer.describe(), status_code=201,
                        headers={"Location": f"/v1/layers/{name}"})


@router.get("/layers/{name:layer}", response_model=LayerInfo, summary="Describe a layer",
            dependencies=[Depends(_only_post_on_conv)], responses=responses(404, 409, 422, 503))
async def get_layer(request: Request, name: NameParam) -> dict[str, Any]:
    """The stored layer's description; 409 if its file is corrupt."""
    name = _checked_name(name)
    layer: Layer = await offload(_stored, store_of(request.app).get, name)
    return layer.describe()


@router.delete("/layers/{name:layer}", status_code=204, response_class=Response,
               summary="Delete a layer",
               dependencies=[Depends(_only_post_on_conv), Depends(auth.require_layer_write)],
               responses={204: {"description": "deleted"}, **responses(404, 422, 503)})
async def delete_layer(request: Request, name: NameParam) -> Response:
    """Remove the layer's file, corrupt or not."""
    name = _checked_name(name)
    await offload(_stored, store_of(request.app).delete, name)
    return Response(status_code=204)


def _layer_job(store: LayerStore, name: str, blob: bytes, relu: bool, out_scale: float | None,
               out_zero_point: int | None, out_type: str, backend_name: str,
               max_elements: int) -> conv.ConvOutput:
    t0 = time.perf_counter()
    layer: Layer = _stored(store.get, name)
    a = layer.attrs
    args = conv.ConvArgs(bias=layer.bias, stride=a.stride, padding=a.padding,
                         dilation=a.dilation, groups=a.groups, relu=relu, out_scale=out_scale,
                         out_zero_point=out_zero_point)
    timings = [("load", time.perf_counter() - t0)]
    return conv.convolve(blob, layer.weights, args, out_type, backend_name, max_elements,
                         cache=True, endpoint="/v1/layers/{name}/conv2d", timings=timings)


@router.post(
    "/layers/{name:layer}/conv2d", response_class=Response,
    summary="Convolve quantized activations with a stored layer",
    openapi_extra={"requestBody": {"required": True, "description": "a featcodec bitstream of "
                                   "the activations: NCHW, linear or symmetric, per tensor",
                                   "content": {bodies.OCTET_STREAM: {"schema": conv.BINARY}}}},
    responses={200: conv.CONV_RESPONSE, **responses(400, 404, 406, 409, 413, 415, 422, 503)},
)
async def layer_conv2d(
    request: Request, name: NameParam,
    relu: Annotated[bool, Query(description="clamp at 0 (at the output zero point when "
                                            "requantized)")] = False,
    out_scale: Annotated[float | None, Query(description="requantize the output to 8-bit "
                                                         "codes with this scale",
                                             examples=[0.05])] = None,
    out_zero_point: Annotated[int | None, Query(description="zero point of the requantized "
                                                            "output (default 0)",
                                                examples=[0])] = None,
) -> Response:
    """`POST /v1/conv2d` with the stored layer's weights, bias and attributes.

    Its onnxruntime sessions (or numpy's prepared weights) stay cached in each
    process while the layer's file is unchanged.
    """
    name = _checked_name(name)
    unknown = set(request.query_params) - _CONV_QUERY
    if unknown:
        raise InvalidParameters(f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                                f"accepted: {', '.join(sorted(_CONV_QUERY))}")
    out_type = conv.output_type(request.headers.get("accept"), out_scale is not None)
    kind = bodies.media_type(request.headers.get("content-type"))
    if kind not in ("", bodies.OCTET_STREAM):
        raise UnsupportedMediaType(f"send the activations' bitstream as {bodies.OCTET_STREAM}, "
                                   f"not {kind}")
    settings = settings_of(request)
    backend_name = conv.backend(settings)
    blob = await bodies.read_body(request, settings.max_body_bytes)
    out = await offload(_layer_job, store_of(request.app), name, blob, relu, out_scale,
                        out_zero_point, out_type, backend_name, settings.max_elements)
    return out.response(request)


# After the conv2d route: this one also matches POST /v1/layers/NAME/conv2d by its path.
@router.api_route("/layers/{name:layer}", methods=["POST", "PATCH", "HEAD", "OPTIONS"],
                  include_in_schema=False, dependencies=[Depends(_only_post_on_conv)])
async def other_methods(name: str) -> Response:
    """405 with every method of ``/v1/layers/{name}`` (Starlette would list only the
    first of its three routes)."""
    raise StarletteHTTPException(405, headers={"Allow": "GET, PUT, DELETE"})
