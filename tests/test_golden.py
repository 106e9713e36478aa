"""Pinned streams: any change to the format or the codes fails here.

A deliberate change bumps the format version and adds a new folder; the old
folders must keep decoding to the values they decoded to before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import codec

GOLDEN = Path(__file__).parent / "golden"
CASES = [(d, c) for d in sorted(GOLDEN.glob("v*")) if d.is_dir()
         for c in json.loads((d / "cases.json").read_text())]


def _id(case: tuple[Path, dict]) -> str:
    return f"{case[0].name}-{case[1]['name']}"


def test_golden_set_is_not_empty() -> None:
    assert len(CASES) >= 13


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_encoder_reproduces_current_version(case: tuple[Path, dict]) -> None:
    folder, c = case
    blob = (folder / f"{c['name']}.fcq").read_bytes()
    if codec.inspect(blob)["format_version"] != 1:
        pytest.fail("update this test when the format version changes")
    x = np.load(folder / f"{c['name']}.npy", allow_pickle=False)
    assert codec.encode(x, c["method"], c["bits"], c["axis"], **c["params"]) == blob


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_golden_stream_decodes_close_to_its_input(case: tuple[Path, dict]) -> None:
    folder, c = case
    blob = (folder / f"{c['name']}.fcq").read_bytes()
    x = np.load(folder / f"{c['name']}.npy", allow_pickle=False)
    y = codec.decode(blob)
    info = codec.inspect(blob)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert info["method"] == c["method"] and info["bits"] == c["bits"]
    assert info["axis"] == c["axis"]
    # Loose sanity bound: the pinned bytes above are the strict check.
    assert np.max(np.abs(y - x)) <= np.max(np.abs(x)) + 1e-6


def test_format_doc_worked_example_is_what_encode_writes() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    block = doc.split("## Worked example", 1)[1].split("```")[1]
    expected = bytes.fromhex(block.strip())
    x = np.array([[-1, 0, 0.5, 1, 2], [0.25, -0.5, 1.5, -0.75, 0.1]], np.float32)
    assert codec.encode(x, "linear", bits=3) == expected
    assert codec.decode(expected).tolist() == [[-1, 0, 0.5, 1, 2], [0, -0.5, 1.5, -1, 0]]
