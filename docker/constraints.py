"""Print docker/constraints.txt: exact versions of the service's runtime dependency tree.

The tree is what `pip install ".[service]"` installs: the `service` extra of
featcodec's own metadata, followed through each dependency's requirements
(markers evaluated for this interpreter, which must be the image's Python
minor version), with the versions installed in the current environment; the
same names and versions `pip freeze` prints for them. Run it from the repo
root in the project's venv, after installing or upgrading what you want to pin:

    .venv/bin/python docker/constraints.py > docker/constraints.txt

tests/test_deploy.py installs the image's dependencies with these constraints
in a clean venv and fails if anything installed is missing here or anything
here is not installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRA = "service"
DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"


def image_python() -> tuple[int, int]:
    m = re.search(r"^FROM\s+python:(\d+)\.(\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    if not m:
        raise SystemExit(f"no 'FROM python:X.Y' line in {DOCKERFILE}")
    return int(m.group(1)), int(m.group(2))


def wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(root: str, extras: set[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo = [(r, {e for e in r.extras})
            for r in map(Requirement, metadata.requires(root) or [])
            if wanted(r, extras)]
    while todo:
        req, req_extras = todo.pop()
        name = canonicalize_name(req.name)
        if name == canonicalize_name(root):  # self-reference such as featcodec[client]
            todo.extend((r, set(r.extras)) for r in map(Requirement, metadata.requires(root) or [])
                        if wanted(r, req_extras))
            continue
        dist = metadata.distribution(req.name)
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"installed {req.name} {dist.version} does not satisfy {req}")
        if name in pins and not req_extras:
            continue
        pins[name] = dist.version
        todo.extend((r, set(r.extras)) for r in map(Requirement, dist.requires or [])
                    if wanted(r, req_extras))
    return pins


def main() -> None:
    if sys.version_info[:2] != image_python():
        raise SystemExit(f"run this with Python {'.'.join(map(str, image_python()))} "
                         f"(the image's); this is {sys.version.split()[0]}")
    pins = closure("featcodec", {EXTRA})
    print("# Exact versions of everything `pip install \".[service]\"` installs in the image")
    print(f"# (Python {'.'.join(map(str, image_python()))}, Linux). Generated, do not edit:")
    print("#     .venv/bin/python docker/constraints.py > docker/constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
