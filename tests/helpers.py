"""Shared test helpers: the golden cases and float64 comparisons."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"


@lru_cache(maxsize=1)
def golden():
    """(index, arrays) of tests/data/mora_cases.npz, a copy of the project's float64 golden cases."""
    z = np.load(DATA / "mora_cases.npz")
    return json.loads(bytes(z["index.json"])), {k: z[k] for k in z.files if k != "index.json"}


def golden_ids():
    return [case["id"] for case in golden()[0]]


def golden_case(case_id: str):
    index, arrays = golden()
    case = next(c for c in index if c["id"] == case_id)
    tensors = {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(case_id + "/")}
    return case, tensors
