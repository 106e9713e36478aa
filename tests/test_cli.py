"""The ``featcodec`` command, run as a subprocess: every subcommand, files, stdin/stdout,
directories, ``--server``, exit codes and one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import codec

from conftest import ROOT, Server, free_port

METHODS = [m["name"] for m in codec.methods()]


def run(*args: str, stdin: bytes | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FEATCODEC_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "app.cli", *args], input=stdin,
                          capture_output=True, cwd=cwd or ROOT, env=environ, timeout=120,
                          check=False)


def ok(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    proc = run(*args, **kwargs)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    return proc


def fails(code: int, *args: str, **kwargs: Any) -> str:
    """Run, expect ``code``, and return the single line of stderr."""
    proc = run(*args, **kwargs)
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def tensor(shape: tuple[int, ...] = (2, 3, 8, 8), seed: int = 0,
           dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    arr: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    return arr


@pytest.fixture()
def x_file(tmp_path: Path) -> tuple[np.ndarray, Path]:
    x = tensor()
    path = tmp_path / "x.npy"
    np.save(path, x)
    return x, path


# --------------------------------------------------------------------------- files

def test_compress_info_decompress_files(x_file: tuple[np.ndarray, Path], tmp_path: Path
                                        ) -> None:
    x, path = x_file
    out = tmp_path / "x.fcqt"
    ok("compress", str(path), "-o", str(out), "--method", "mulaw", "--bits", "4", "--axis",
       "1", "--param", "mu=100")
    blob = out.read_bytes()
    assert blob == codec.encode(x, "mulaw", 4, 1, mu=100)

    info = ok("info", str(out)).stdout.decode()
    assert f"{out}: featcodec stream v1, {len(blob):,} bytes" in info
    assert "mulaw, 4 bits, signed" in info and "2x3x8x8" in info
    assert "per channel along axis 1" in info and "mu = 100" in info
    assert f"{codec.inspect(blob)['ratio']:.2f}x" in info

    as_json = json.loads(ok("info", str(out), "--json").stdout)
    assert as_json == {"file": str(out), **json.loads(json.dumps(codec.inspect(blob)))}

    back = tmp_path / "back.npy"
    ok("decompress", str(out), "-o", str(back))
    np.testing.assert_array_equal(np.load(back), codec.decode(blob))


def test_default_output_names(x_file: tuple[np.ndarray, Path]) -> None:
    x, path = x_file
    ok("compress", str(path))
    stream = path.with_suffix(".fcqt")
    assert stream.read_bytes() == codec.encode(x)
    umask = os.umask(0)
    os.umask(umask)
    assert stream.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    path.unlink()
    ok("decompress", str(stream))
    np.testing.assert_array_equal(np.load(path), codec.decode(stream.read_bytes()))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_params(method: str, tmp_path: Path) -> None:
    x = np.maximum(tensor(), 0)
    src = tmp_path / "a.npy"
    np.save(src, x)
    params = {"linear": ["scale=0.05,0.1,0.2", "zero_point=3"], "symmetric": ["signed=true"],
              "mulaw": ["mu=50", "max_abs=4"], "log": ["beta=1.5"],
              "exp": ["lam_fit=equiprobable"]}[method]
    all_kwargs: dict[str, dict[str, Any]] = {
        "linear": {"scale": [0.05, 0.1, 0.2], "zero_point": 3}, "symmetric": {"signed": True},
        "mulaw": {"mu": 50, "max_abs": 4}, "log": {"beta": 1.5},
        "exp": {"lam_fit": "equiprobable"}}
    kwargs = all_kwargs[method]
    args = ["compress", str(src), "-o", "-", "-m", method, "-b", "5", "--axis", "1"]
    for p in params:
        args += ["-p", p]
    assert ok(*args).stdout == codec.encode(x, method, 5, 1, **kwargs)


# --------------------------------------------------------------------------- stdin/stdout

def test_stdin_stdout_pipeline_is_binary_safe(tmp_path: Path) -> None:
    x = tensor(dtype=np.float16)
    blob = ok("compress", "-", "-b", "6", stdin=npy_bytes(x)).stdout
    assert blob == codec.encode(x, "linear", 6)
    y = load_npy(ok("decompress", "-", stdin=blob).stdout)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, codec.decode(blob))
    info = json.loads(ok("info", "-", "--json", stdin=blob).stdout)
    assert info["file"] == "stdin" and info["bits"] == 6
    # - as output for a file input, and a file output for stdin input
    out = tmp_path / "o.fcqt"
    ok("compress", "-", "-o", str(out), "-b", "6", stdin=npy_bytes(x))
    assert out.read_bytes() == blob


# --------------------------------------------------------------------------- directories

def test_directory_mode(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    arrays = {f"t{i}": np.maximum(tensor(seed=i), 0) for i in range(4)}
    for name, x in arrays.items():
        np.save(src / f"{name}.npy", x)
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    proc = ok("compress", str(src), "-o", str(out), "-m", "log", "-b", "4", "--progress")
    err = proc.stderr.decode()
    assert "4/4" in err  # the progress bar (tqdm or the plain counter)
    assert "4 of 4 files" in err.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.fcqt" for n in sorted(arrays)]
    for name, x in arrays.items():
        assert (out / f"{name}.fcqt").read_bytes() == codec.encode(x, "log", 4)

    infos = json.loads(ok("info", str(out), "--json").stdout)
    assert [Path(i["file"]).name for i in infos] == [f"{n}.fcqt" for n in sorted(arrays)]

    back = tmp_path / "back"
    proc = ok("decompress", str(out), "-o", str(back), "--no-progress")
    assert "4 of 4 files" in proc.stderr.decode()
    for name in arrays:
        blob = (out / f"{name}.fcqt").read_bytes()
        np.testing.assert_array_equal(np.load(back / f"{name}.npy"), codec.decode(blob))
    assert ok("decompress", str(out), "-o", str(back), "-q").stderr == b""


def test_directory_with_a_bad_file_processes_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "a.npy", tensor())
    (src / "b.npy").write_bytes(b"garbage")
    np.save(src / "c.npy", tensor(seed=3))
    proc = run("compress", str(src), "-o", str(tmp_path / "out"))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert f"{src / 'b.npy'}: not a .npy file" in err and "2 of 3 files" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.fcqt", "c.fcqt"]


# --------------------------------------------------------------------------- bench

def test_bench_is_quick_and_lists_every_method() -> None:
    proc = ok("bench", "--shape", "1,8,32,32", "--repeat", "1")
    table = proc.stdout.decode()
    for method in METHODS:
        assert any(line.startswith(method) for line in table.splitlines())
    assert "encode MB/s" in table and "SNR dB" in table
    rows = json.loads(ok("bench", "--shape", "256", "--bits", "8", "--methods",
                         "linear,exp", "--json", "--repeat", "1").stdout)
    assert [(r["method"], r["bits"]) for r in rows] == [("linear", 8), ("exp", 8)]
    assert all(r["encode_mb_s"] > 0 and r["ratio"] > 3 for r in rows)


# --------------------------------------------------------------------------- --server

@pytest.mark.integration
def test_server_mode_matches_local(server: Server, x_file: tuple[np.ndarray, Path],
                                   tmp_path: Path) -> None:
    x, path = x_file
    remote = tmp_path / "remote.fcqt"
    ok("compress", str(path), "-o", str(remote), "-m", "exp", "-b", "3", "--axis", "1",
       "--server", server.url, "--api-key", "k")
    assert remote.read_bytes() == codec.encode(x, "exp", 3, 1)
    y = load_npy(ok("decompress", str(remote), "-o", "-", "--server", server.url).stdout)
    np.testing.assert_array_equal(y, codec.decode(remote.read_bytes()))
    local_info = ok("info", str(remote)).stdout
    assert ok("info", str(remote), "--server", server.url).stdout == local_info

    src = tmp_path / "dir"
    src.mkdir()
    for i in range(3):
        np.save(src / f"{i}.npy", tensor(seed=i))
    ok("compress", str(src), "-o", str(tmp_path / "dir_out"), "--server", server.url)
    for i in range(3):
        assert (tmp_path / "dir_out" / f"{i}.fcqt").read_bytes() == \
            codec.encode(tensor(seed=i))

    line = fails(1, "decompress", "-", "--server", server.url, stdin=b"FCQT junk")
    assert "corrupt or invalid stream" in line
    line = fails(2, "compress", str(path), "-m", "nope", "--server", server.url)
    assert "unknown method 'nope'" in line


@pytest.mark.integration
def test_api_key_option_and_environment(api_key_server: Server,
                                        x_file: tuple[np.ndarray, Path]) -> None:
    x, path = x_file
    url = api_key_server.url
    assert ok("compress", str(path), "-o", "-", "--server", url, "--api-key",
              "first-key").stdout == codec.encode(x)
    assert ok("compress", str(path), "-o", "-", "--server", url,
              env={"FEATCODEC_API_KEY": "second-key"}).stdout == codec.encode(x)
    line = fails(1, "compress", str(path), "-o", "-", "--server", url)
    assert "401 Unauthorized" in line


def test_unreachable_server_is_a_one_line_error(x_file: tuple[np.ndarray, Path]) -> None:
    _, path = x_file
    url = f"http://127.0.0.1:{free_port()}"
    line = fails(1, "compress", str(path), "-o", "-", "--server", url, "--timeout", "2")
    assert line.startswith("featcodec compress: error: cannot reach") and url in line


# --------------------------------------------------------------------------- bad input

def test_corrupt_stream_exit_1(x_file: tuple[np.ndarray, Path], tmp_path: Path) -> None:
    x, _ = x_file
    blob = codec.encode(x)
    bad = tmp_path / "bad.fcqt"
    bad.write_bytes(blob[:-1])
    assert "truncated" in fails(1, "decompress", str(bad), "-o", str(tmp_path / "o.npy"))
    assert not (tmp_path / "o.npy").exists()  # nothing half-written
    flipped = bytearray(blob)
    flipped[40] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    assert "corrupt or invalid stream" in fails(1, "info", str(bad))
    assert "corrupt or invalid stream" in fails(1, "decompress", "-", stdin=b"hello")


@pytest.mark.parametrize(("data", "message"), [
    (b"not numpy", "not a .npy file"),
    (b"\x93NUMPY\x01\x00garbage", "unreadable .npy file"),
    (npy_bytes(np.array([1.0, np.nan], np.float32)), "NaN"),
    (npy_bytes(np.arange(6)), "dtype"),
])
def test_bad_tensor_exit_1(data: bytes, message: str) -> None:
    line = fails(1, "compress", "-", "-o", "-", stdin=data)
    assert line.startswith("featcodec compress: error:") and message in line


@pytest.mark.parametrize(("args", "message"), [
    (["compress", "{x}", "-m", "nope"], "unknown method 'nope'"),
    (["compress", "{x}", "-b", "9"], "--bits must be in [1, 8]"),
    (["compress", "{x}", "-b", "eight"], "invalid int value"),
    (["compress", "{x}", "-p", "bogus=1"], "has no parameter bogus"),
    (["compress", "{x}", "-p", "noequals"], "NAME=VALUE"),
    (["compress", "{x}", "-m", "symmetric", "-p", "signed=maybe"], "true or false"),
    (["compress", "{missing}"], "no such file or directory"),
    (["compress", "{dir}"], "give an output directory with -o DIR"),
    (["compress", "{x}", "-o", "{x}"], "would overwrite the input"),
    (["decompress", "{missing}"], "no such file or directory"),
    (["info", "{missing}"], "no such file or directory"),
    (["info", "{dir}"], "no .fcqt files found"),
    (["bench", "--shape", "a,b"], "comma-separated integers"),
    (["bench", "--methods", "zip"], "unknown method"),
    (["frobnicate"], "invalid choice"),
    (["compress"], "required: IN"),
    (["compress", "{x}", "--no-such-option"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(args: list[str], message: str,
                             x_file: tuple[np.ndarray, Path], tmp_path: Path) -> None:
    _, path = x_file
    (tmp_path / "empty").mkdir()
    fill = {"x": str(path), "missing": str(tmp_path / "missing.npy"),
            "dir": str(tmp_path / "empty")}
    line = fails(2, *[a.format(**fill) for a in args])
    assert line.startswith("featcodec") and message in line


def test_no_command_prints_help_exit_2() -> None:
    proc = run()
    assert proc.returncode == 2 and b"usage: featcodec" in proc.stderr
    assert b"compress" in proc.stderr and b"bench" in proc.stderr


def test_help_of_every_subcommand() -> None:
    for command in ("serve", "compress", "decompress", "info", "bench"):
        proc = ok(command, "--help")
        assert f"usage: featcodec {command}".encode() in proc.stdout


def test_local_commands_need_neither_the_service_nor_httpx() -> None:
    code = ("import sys; from app import cli; "
            "assert cli.main(['bench', '--shape', '64', '--repeat', '1']) == 0; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'pydantic', 'httpx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


def test_encode_options_and_auto_method(x_file: tuple[np.ndarray, Path], tmp_path: Path
                                        ) -> None:
    x, path = x_file
    out = tmp_path / "auto.fcq"
    ok("compress", str(path), "-o", str(out), "-m", "auto", "-p", "entropy=ans",
       "-p", "target_snr_db=25")
    blob = out.read_bytes()
    assert blob == codec.encode(x, "auto", entropy="ans", target_snr_db=25)
    y = codec.decode(blob)
    assert 10 * np.log10(np.mean(x**2) / np.mean((x - y) ** 2)) >= 25
    assert "entropy" in fails(2, "compress", str(path), "-o", str(out), "-p", "bogus=1")
