"""Assertions shared by the model tests, and access to the sections of the 4-rank suite's results."""

from __future__ import annotations

import pytest
import torch

# fp32 on CPU: parallel layouts only reorder sums (all-reduce, sharded matmuls).
FP32 = {"rtol": 1e-4, "atol": 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_close with the fp32 tolerance and a message naming the tensor."""
    torch.testing.assert_close(actual, expected, **FP32, msg=lambda m: f"{what}: {m}")


def assert_grads_match(actual: dict, expected: dict, what: str) -> None:
    """Same parameter names, each gradient equal within fp32 tolerance."""
    assert sorted(actual) == sorted(expected), f"{what}: parameter sets differ"
    for name in expected:
        assert_close(actual[name], expected[name], f"{what} grad {name}")


def section_of(suite: list[dict], key: str, rank: int) -> dict:
    """Rank ``rank``'s result of section ``key``; fails the test with the traceback if it raised."""
    entry = suite[rank][key]
    if not entry["ok"]:
        pytest.fail(f"section {key!r} failed on rank {rank}:\n{entry['error']}", pytrace=False)
    return entry["value"]


def layout_results(suite: list[dict], key: str) -> list[dict]:
    """One model replica's per-rank results of a layout (data-parallel rank 0), each with its coords."""
    ranks = [r for r in range(len(suite)) if suite[r][key].get("coords", {}).get("dp") == 0]
    if not ranks:  # the layout never ran: report why
        section_of(suite, key, 0)
    return [{**section_of(suite, key, r), **suite[r][key]["coords"]} for r in ranks]
