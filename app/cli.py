"""The ``featcodec`` command. Each subcommand registers itself in ``build_parser``.

``serve`` runs the HTTP service; ``compress``, ``decompress``, ``info`` and
``bench`` work on files, directories or stdin/stdout, locally with the
``codec`` library or, given ``--server URL``, through the service with
``codec.client``. Exit codes: 0 success, 1 processing error (unreadable or
corrupt input, data the codec refuses, a server that fails or cannot be
reached), 2 usage error (bad options, unknown method, missing input). Errors
are one line on stderr, never a traceback (set FEATCODEC_DEBUG=1 to see one).

Only ``serve`` needs the service's packages, and only ``--server`` needs httpx:
they are imported when used, so the local commands need nothing but numpy.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import codec

from .numbers import number_list

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # not imported from .metrics: see _serve
API_KEY_ENV = "FEATCODEC_API_KEY"
DEBUG_ENV = "FEATCODEC_DEBUG"
STREAM_SUFFIX = ".fcqt"
NPY_SUFFIX = ".npy"
BOOLEAN_OPTIONS = frozenset({"signed", "restricted"})  # as the service parses them
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})

EXIT_OK, EXIT_PROCESSING, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line: exit 2. ``prog`` names the (sub)command whose help to point at."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class ProcessingError(Exception):
    """An input could not be processed: exit 1."""


# --------------------------------------------------------------------------- serve

def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the HTTP service (uvicorn)",
                       description="Run the HTTP service. Defaults come from FEATCODEC_* "
                                   "environment variables (see docs/SERVICE.md).")
    p.add_argument("--host", help="bind address (FEATCODEC_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (FEATCODEC_PORT, default 8000)")
    p.add_argument("--workers", type=int, help="worker processes (FEATCODEC_WORKERS, default 1)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug",
                                           "trace"],
                   help="uvicorn log level (FEATCODEC_LOG_LEVEL, default info)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                   ("workers", args.workers), ("log_level", args.log_level))
                 if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"featcodec serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .limits import GuardedHttpToolsProtocol, exit_zero_on_sigterm

    exit_zero_on_sigterm()  # uvicorn drains on SIGTERM, then re-raises it: exit 0, not 143
    # prometheus-client picks its multiprocess mode at import time, so the directory
    # must exist in the environment before any worker imports the app.
    own_dir = None
    if settings.workers > 1 and not os.environ.get(MULTIPROC_ENV):
        own_dir = tempfile.mkdtemp(prefix="featcodec-metrics-")
        os.environ[MULTIPROC_ENV] = own_dir
    try:
        uvicorn.run("app.main:create_app", factory=True, host=settings.host,
                    port=settings.port, workers=settings.workers,
                    log_level=settings.log_level, http=GuardedHttpToolsProtocol,
                    timeout_keep_alive=settings.keep_alive_s,
                    timeout_graceful_shutdown=settings.graceful_timeout_s)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- backends

class _Local:
    """The codec library in this process."""

    def methods(self) -> list[dict[str, Any]]:
        return codec.methods()

    def encode(self, arr: np.ndarray, method: str, bits: int, axis: int | None,
               params: dict[str, Any]) -> bytes:
        try:
            return codec.encode(arr, method=method, bits=bits, axis=axis, **params)
        except (TypeError, ValueError) as exc:
            raise ProcessingError(f"cannot compress: {exc}") from None

    def decode(self, blob: bytes) -> np.ndarray:
        try:
            return codec.decode(blob)
        except (TypeError, ValueError) as exc:
            raise ProcessingError(f"corrupt or invalid stream: {exc}") from None

    def inspect(self, blob: bytes) -> dict[str, Any]:
        try:
            return codec.inspect(blob)
        except (TypeError, ValueError) as exc:
            raise ProcessingError(f"corrupt or invalid stream: {exc}") from None

    def close(self) -> None:
        pass


class _Remote:
    """The service, through one ``codec.client.Client`` (connections reused across files)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        try:
            from codec import client
        except ImportError as exc:
            raise UsageError(f"--server needs the client extra: pip install "
                             f"'featcodec[client]' ({exc})") from None
        self._mod = client
        self._client = client.Client(url, api_key=api_key, timeout=timeout)
        self.url = url

    def _call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        client = self._mod
        try:
            return func(*args, **kwargs)
        except client.ServiceConnectionError as exc:
            raise ProcessingError(f"cannot reach {self.url}: {exc.detail}") from None
        except client.MalformedBitstreamError as exc:
            raise ProcessingError(f"corrupt or invalid stream: {exc.detail}") from None
        except client.ServiceError as exc:
            raise ProcessingError(f"{what}: server answered {exc.status_code} {exc.title}: "
                                  f"{exc.detail}") from None
        except (TypeError, ValueError) as exc:  # refused before sending
            raise ProcessingError(f"{what}: {exc}") from None

    def methods(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("codecs", self._client.codecs)
        return result

    def encode(self, arr: np.ndarray, method: str, bits: int, axis: int | None,
               params: dict[str, Any]) -> bytes:
        result: bytes = self._call("cannot compress", self._client.compress, arr, method,
                                   bits, axis, **params)
        return result

    def decode(self, blob: bytes) -> np.ndarray:
        result: np.ndarray = self._call("cannot decompress", self._client.decompress, blob)
        return result

    def inspect(self, blob: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self._call("cannot inspect", self._client.inspect, blob)
        return result

    def close(self) -> None:
        self._client.close()


def _backend(args: argparse.Namespace) -> _Local | _Remote:
    if getattr(args, "server", None):
        key = args.api_key or os.environ.get(API_KEY_ENV) or None
        return _Remote(args.server, key, args.timeout)
    return _Local()


# --------------------------------------------------------------------------- files

def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProcessingError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_npy(data: bytes, name: str) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):
        raise ProcessingError(f"{name}: not a .npy file")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises assorted types for damaged files
        raise ProcessingError(f"{name}: unreadable .npy file: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise ProcessingError(f"{name}: not a single .npy array")
    return arr


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_output(path: str, data: bytes) -> None:
    """Write atomically (temporary file, then rename): a failure leaves no partial file."""
    if path == "-":
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): not worth a message.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise ProcessingError("") from None
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise ProcessingError(f"cannot write {path}: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_binary_stdout(out: str) -> None:
    if out == "-" and sys.stdout.isatty():
        raise UsageError("refusing to write binary data to a terminal; use -o FILE or "
                         "redirect stdout")


def _plan(inp: str, out: str | None, in_suffix: str, out_suffix: str
          ) -> tuple[list[tuple[str, str]], bool]:
    """(input, output) pairs for one file, stdin or a directory; and whether it is a directory."""
    if inp == "-":
        return [("-", out or "-")], False
    src = Path(inp)
    if src.is_dir():
        if not out or out == "-":
            raise UsageError(f"{inp} is a directory: give an output directory with -o DIR")
        dst = Path(out)
        if dst.exists() and not dst.is_dir():
            raise UsageError(f"{out} exists and is not a directory")
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix == in_suffix)
        return [(str(p), str(dst / (p.stem + out_suffix))) for p in files], True
    if not src.exists():
        raise UsageError(f"{inp}: no such file or directory")
    if out is None:
        out = str(src.with_suffix(out_suffix))
    elif out != "-" and Path(out).is_dir():
        out = str(Path(out) / (src.stem + out_suffix))
    if out != "-" and Path(out).resolve() == src.resolve():
        raise UsageError(f"output {out} would overwrite the input")
    return [(inp, out)], False


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain one-line counter."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="file", file=sys.stderr,
                                 dynamic_ncols=True, leave=True)

    def update(self, name: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(Path(name).name, refresh=False)
            self._bar.update(1)
        else:
            end = "\n" if self.n == self.total else ""
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} {Path(name).name[:40]:40}"
                             f"{end}")
            sys.stderr.flush()

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            if self.enabled and self.n:
                sys.stderr.write("\n")
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _run_batch(args: argparse.Namespace, pairs: list[tuple[str, str]], is_dir: bool,
               desc: str, work: Callable[[str, str], tuple[int, int]],
               show_ratio: bool = True) -> int:
    """Apply ``work(inp, out) -> (bytes in, bytes out)`` to every pair; report; exit code."""
    if is_dir and not pairs:
        raise UsageError(f"{args.input}: no {desc} input files found")
    enabled = is_dir and (args.progress if args.progress is not None else sys.stderr.isatty())
    progress = _Progress(len(pairs), desc, bool(enabled))
    failed = 0
    total_in = total_out = 0
    try:
        for inp, out in pairs:
            try:
                n_in, n_out = work(inp, out)
                total_in += n_in
                total_out += n_out
            except ProcessingError as exc:
                failed += 1
                if str(exc):
                    label = "stdin" if inp == "-" else inp
                    msg = str(exc) if str(exc).startswith(label) else f"{label}: {exc}"
                    progress.write(f"featcodec {args.command}: error: {msg}")
                if not is_dir:
                    return EXIT_PROCESSING
            progress.update(inp)
    finally:
        progress.close()
    if is_dir and not args.quiet:
        ok = len(pairs) - failed
        ratio = f" ({total_in / total_out:.2f}x)" if total_out and show_ratio else ""
        print(f"featcodec {args.command}: {ok} of {len(pairs)} files, {_size(total_in)} -> "
              f"{_size(total_out)}{ratio}" + (f", {failed} failed" if failed else ""),
              file=sys.stderr)
    return EXIT_PROCESSING if failed else EXIT_OK


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# --------------------------------------------------------------------------- compress

def _parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` as ``codec.encode`` keyword arguments, with the service's query rules."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--param expects NAME=VALUE, got {text!r}")
    if name in BOOLEAN_OPTIONS:
        word = value.strip().lower()
        if word not in _TRUE | _FALSE:
            raise UsageError(f"--param {name}: expected true or false, got {value!r}")
        return name, word in _TRUE
    numbers = number_list(value)
    if numbers is None:
        return name, value  # text, e.g. lam_fit=equiprobable
    return name, numbers[0] if len(numbers) == 1 else numbers


def _validate_encoding(methods: list[dict[str, Any]], method: str, bits: int,
                       params: dict[str, Any]) -> None:
    from codec.api import ENCODE_OPTIONS  # the lossless stage, clipping and targets

    by_name = {m["name"]: m for m in methods}
    if method == "auto":  # the codec picks the method: any method's option may apply
        options = {o for m in methods for o in m["options"]}
        lo, hi = 1, 8
    elif method in by_name:
        m = by_name[method]
        options = set(m["options"])
        lo = min(m["bits"]["unsigned"][0], m["bits"]["signed"][0])
        hi = max(m["bits"]["unsigned"][1], m["bits"]["signed"][1])
    else:
        raise UsageError(f"unknown method {method!r}; choose from auto, "
                         f"{', '.join(sorted(by_name))}")
    if not lo <= bits <= hi:
        raise UsageError(f"{method}: --bits must be in [{lo}, {hi}], got {bits}")
    unknown = set(params) - options - set(ENCODE_OPTIONS)
    if unknown:
        raise UsageError(f"{method} has no parameter {', '.join(sorted(unknown))}; accepted: "
                         f"{', '.join(sorted(options | set(ENCODE_OPTIONS)))}")


def _add_remote_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service")
    g.add_argument("--server", metavar="URL",
                   help="use the featcodec service at URL instead of the local library")
    g.add_argument("--api-key", help=f"bearer token for --server (default: ${API_KEY_ENV})")
    g.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per request with --server (default 60)")


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar for directories (default: when stderr is a terminal)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")


def _add_compress(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "compress", help="quantize .npy tensors into featcodec bitstreams",
        description="Quantize a .npy tensor (or every .npy file of a directory) into a "
                    f"featcodec bitstream ({STREAM_SUFFIX}). IN may be '-' for stdin.")
    p.add_argument("input", metavar="IN", help=".npy file, directory of .npy files, or -")
    p.add_argument("-o", "--output", metavar="OUT",
                   help=f"output file, directory, or - for stdout (default: IN with "
                        f"{STREAM_SUFFIX}; stdout when IN is -)")
    p.add_argument("-m", "--method", default="linear",
                   help="codec method (see 'featcodec bench'; default linear)")
    p.add_argument("-b", "--bits", type=int, default=8, help="bits per element (default 8)")
    p.add_argument("--axis", type=int, default=None,
                   help="channel axis for per-channel parameters (default: per tensor)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method or encode option, e.g. mu=255, signed=true, scale=0.1,0.2, "
                        "entropy=ans, clip=mse, target_snr_db=30 (repeatable)")
    _add_batch_options(p)
    _add_remote_options(p)
    p.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    params = dict(_parse_param(t) for t in args.param)
    pairs, is_dir = _plan(args.input, args.output, NPY_SUFFIX, STREAM_SUFFIX)
    if not is_dir:
        _check_binary_stdout(pairs[0][1])
    backend = _backend(args)
    try:
        _validate_encoding(backend.methods(), args.method, args.bits, params)

        def work(inp: str, out: str) -> tuple[int, int]:
            arr = _load_npy(_read_input(inp), "stdin" if inp == "-" else inp)
            blob = backend.encode(arr, args.method, args.bits, args.axis, params)
            _write_output(out, blob)
            return arr.nbytes, len(blob)

        return _run_batch(args, pairs, is_dir, "compress", work)
    finally:
        backend.close()


# --------------------------------------------------------------------------- decompress

def _add_decompress(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "decompress", help="decode featcodec bitstreams into .npy tensors",
        description=f"Verify and decode a bitstream (or every {STREAM_SUFFIX} file of a "
                    "directory) into a .npy file. IN may be '-' for stdin.")
    p.add_argument("input", metavar="IN", help=f"bitstream, directory of {STREAM_SUFFIX} "
                                               "files, or -")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output .npy file, directory, or - for stdout (default: IN with .npy; "
                        "stdout when IN is -)")
    _add_batch_options(p)
    _add_remote_options(p)
    p.set_defaults(func=_decompress)


def _decompress(args: argparse.Namespace) -> int:
    pairs, is_dir = _plan(args.input, args.output, STREAM_SUFFIX, NPY_SUFFIX)
    if not is_dir:
        _check_binary_stdout(pairs[0][1])
    backend = _backend(args)
    try:
        def work(inp: str, out: str) -> tuple[int, int]:
            blob = _read_input(inp)
            data = _npy_bytes(backend.decode(blob))
            _write_output(out, data)
            return len(blob), len(data)

        return _run_batch(args, pairs, is_dir, "decompress", work, show_ratio=False)
    finally:
        backend.close()


# --------------------------------------------------------------------------- info

def _add_info(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("info", help="describe bitstreams (header, size, ratio)",
                       description="Print a bitstream's header, size and compression ratio, "
                                   "after verifying its checksum. IN may be '-' for stdin or "
                                   f"a directory of {STREAM_SUFFIX} files.")
    p.add_argument("input", metavar="IN", help="bitstream, directory, or -")
    p.add_argument("--json", action="store_true",
                   help="machine-readable: one JSON object (a list for a directory)")
    _add_remote_options(p)
    p.set_defaults(func=_info)


def _short_values(v: Any, limit: int = 4) -> str:
    if isinstance(v, list):
        shown = ", ".join(f"{e:.6g}" if isinstance(e, float) else str(e) for e in v[:limit])
        more = f", ... ({len(v)} values)" if len(v) > limit else ""
        return f"[{shown}{more}]"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _describe(name: str, info: dict[str, Any]) -> str:
    shape = "x".join(map(str, info["shape"])) or "scalar"
    layout = (f"per channel along axis {info['axis']}" if info["axis"] is not None
              else "per tensor")
    params = "; ".join(f"{k} = {_short_values(v)}" for k, v in info["params"].items()) or "-"
    bpe = info["bits_per_element"]
    sign = "signed" if info["signed"] else "unsigned"
    if info["restricted"]:
        sign += ", restricted"
    lines = [
        f"{name}: featcodec stream v{info['format_version']}, {info['total_bytes']:,} bytes",
        f"  method    {info['method']}, {info['bits']} bits, {sign}",
        f"  tensor    {info['dtype']} {shape} ({info['elements']:,} elements), {layout}",
        f"  params    {params}",
        (f"  size      header {info['header_bytes']:,} B + payload {info['payload_bytes']:,} B "
         f"+ CRC = {info['total_bytes']:,} B; original {info['original_bytes']:,} B"),
        f"  ratio     {info['ratio']:.2f}x" + (f" ({bpe:.2f} bits/element)" if bpe is not None
                                                else ""),
    ]
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    if args.input == "-":
        items, is_dir = ["-"], False
    else:
        src = Path(args.input)
        if src.is_dir():
            items = [str(p) for p in sorted(src.iterdir())
                     if p.is_file() and p.suffix == STREAM_SUFFIX]
            is_dir = True
            if not items:
                raise UsageError(f"{args.input}: no {STREAM_SUFFIX} files found")
        elif src.exists():
            items, is_dir = [args.input], False
        else:
            raise UsageError(f"{args.input}: no such file or directory")
    backend = _backend(args)
    failed = 0
    results: list[dict[str, Any]] = []
    try:
        for item in items:
            label = "stdin" if item == "-" else item
            try:
                info = backend.inspect(_read_input(item))
            except ProcessingError as exc:
                failed += 1
                msg = str(exc) if str(exc).startswith(label) else f"{label}: {exc}"
                print(f"featcodec info: error: {msg}", file=sys.stderr)
                continue
            if args.json:
                results.append({"file": label, **info})
            else:
                print(_describe(label, info))
    finally:
        backend.close()
    if args.json:
        print(json.dumps(results if is_dir else (results[0] if results else None), indent=2))
    return EXIT_PROCESSING if failed else EXIT_OK


# --------------------------------------------------------------------------- bench

def _add_bench(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="quick throughput of every method on this machine",
                       description="Encode and decode a synthetic activation tensor with every "
                                   "method and report throughput, ratio and SNR. Takes "
                                   "seconds.")
    p.add_argument("--shape", default="1,64,64,64",
                   help="tensor shape, comma-separated (default 1,64,64,64: 1 MiB of float32)")
    p.add_argument("--bits", default="8,4", help="bit widths, comma-separated (default 8,4)")
    p.add_argument("--methods", default=None, help="methods, comma-separated (default: all)")
    p.add_argument("--axis", type=int, default=None, help="per-channel axis (default: none)")
    p.add_argument("--data", choices=["relu", "gauss"], default="relu",
                   help="relu: non-negative post-ReLU features (default); gauss: signed")
    p.add_argument("--repeat", type=int, default=3, help="timed runs, best is kept (default 3)")
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    p.set_defaults(func=_bench)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


def _best_time(func: Callable[[], Any], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _bench_rows(x: np.ndarray, methods: list[str], bits_list: list[int], axis: int | None,
                repeat: int) -> Iterator[dict[str, Any]]:
    mb = x.nbytes / 1e6
    power = float(np.mean(np.square(x, dtype=np.float64)))
    for method in methods:
        for bits in bits_list:
            row: dict[str, Any] = {"method": method, "bits": bits}
            try:
                blob = codec.encode(x, method, bits, axis)
            except (TypeError, ValueError) as exc:
                row["error"] = str(exc)
                yield row
                continue
            y = codec.decode(blob)
            err = float(np.mean(np.square(x - y, dtype=np.float64)))
            encode = partial(codec.encode, x, method, bits, axis)
            decode = partial(codec.decode, blob)
            row.update({
                "encode_mb_s": mb / _best_time(encode, repeat),
                "decode_mb_s": mb / _best_time(decode, repeat),
                "ratio": x.nbytes / len(blob),
                "snr_db": 10 * math.log10(power / err) if err > 0 else math.inf,
            })
            yield row


def _bench(args: argparse.Namespace) -> int:
    shape = _int_list(args.shape, "--shape")
    bits_list = _int_list(args.bits, "--bits")
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")
    if any(d < 1 for d in shape) or math.prod(shape) > 2**26:
        raise UsageError("--shape must have positive dimensions and at most 2**26 elements")
    known = [m["name"] for m in codec.methods()]
    methods = known if not args.methods else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")
    if args.axis is not None and not -len(shape) <= args.axis < len(shape):
        raise UsageError(f"--axis {args.axis} is out of range for shape {tuple(shape)}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    if args.data == "relu":
        x = np.maximum(x, 0)
    rows = list(_bench_rows(x, methods, bits_list, args.axis, args.repeat))
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    layout = "per tensor" if args.axis is None else f"per channel (axis {args.axis})"
    print(f"featcodec {codec.__version__} bench: {args.data} data, shape "
          f"{'x'.join(map(str, shape))} float32 ({x.nbytes / 1e6:.1f} MB), {layout}, "
          f"best of {args.repeat}")
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["method"], str(r["bits"]), "-", "-", "-", r["error"][:40]])
        else:
            table.append([r["method"], str(r["bits"]), f"{r['encode_mb_s']:.0f}",
                          f"{r['decode_mb_s']:.0f}", f"{r['ratio']:.2f}x",
                          f"{r['snr_db']:.1f}"])
    print(_table(["method", "bits", "encode MB/s", "decode MB/s", "ratio", "SNR dB"], table,
                 right={1, 2, 3, 4, 5}))
    return EXIT_OK


# --------------------------------------------------------------------------- main

class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise instead of exiting (one exit path in ``main``)."""

    def error(self, message: str) -> Any:
        raise UsageError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featcodec", description="Compress neural-network feature maps.",
        epilog="Exit codes: 0 ok, 1 processing error (unreadable or corrupt input, refused "
               "data, server failure), 2 usage error.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_serve(sub)
    _add_compress(sub)
    _add_decompress(sub)
    _add_info(sub)
    _add_bench(sub)
    return parser


def _err(command: str | None, message: str) -> None:
    prefix = f"featcodec {command}" if command else "featcodec"
    print(f"{prefix}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = getattr(args, "command", None)
        if not hasattr(args, "func"):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        code: int = args.func(args)
        return code
    except UsageError as exc:
        if exc.prog:  # from argparse: point at the right --help
            print(f"{exc.prog}: error: {exc} (see '{exc.prog} --help')", file=sys.stderr)
        else:
            _err(command, str(exc))
        return EXIT_USAGE
    except ProcessingError as exc:
        if str(exc):
            _err(command, str(exc))
        return EXIT_PROCESSING
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line, unless asked for the traceback
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        _err(command, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_PROCESSING


if __name__ == "__main__":
    sys.exit(main())
