"""The public surface of ``codec``: honest __all__, numpy-only import."""

from __future__ import annotations

import subprocess
import sys

import codec


def test_all_is_sorted_and_complete() -> None:
    assert codec.__all__ == sorted(codec.__all__)
    for name in codec.__all__:
        assert hasattr(codec, name), name
    public = {n for n in dir(codec) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(codec, n)).__name__ == "module"}
    assert public - modules - {"annotations"} <= set(codec.__all__)


def test_import_needs_only_numpy() -> None:
    code = ("import sys, codec; heavy = {'httpx', 'onnxruntime', 'onnx', 'zstandard', "
            "'fastapi', 'msgpack', 'torch'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
