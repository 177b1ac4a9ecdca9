"""LongNet's distributed dilated attention on 2 and 4 gloo ranks against one process and the oracle.

Each world size is one process group (module fixtures) running every case of ``checks.py``; the tests
below assert on its results: outputs and dq, dk, dv within float32 tolerance for patterns smaller and
larger than the chunk, causal and not, ragged segments, GQA, TP=2 x CP=2; the bytes a rank sends; and
the LongNet GPTModel's logits, loss and gradients under CP against CP=1.
"""

from __future__ import annotations

import pytest

from longnet_megatron.testing import run_distributed

from .checks import BYTES_CASES, CP2_CASES, CP4_CASES, TP2_CP2_CASES, run_world

TOLERANCE = 1e-5  # relative, float32
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_distributed(run_world, 2, layout=None, args=(2,))


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_distributed(run_world, 4, layout=None, args=(4,))


def _assert_close(results: list[dict], key: str, name: str) -> None:
    for rank_results in results:
        for result in rank_results[key]:
            if result["case"] != name:
                continue
            for what, err in result["errors"].items():
                assert err < TOLERANCE, (
                    f"{name} cp_rank={result['cp_rank']} tp_rank={result['tp_rank']}: {what} relative "
                    f"error {err:.2e}"
                )


@pytest.mark.parametrize("name", [c.name for c in CP2_CASES])
def test_cp2_matches_single_rank_and_oracle(world2, name):
    _assert_close(world2, "attention", name)


@pytest.mark.parametrize("name", [c.name for c in CP4_CASES])
def test_cp4_matches_single_rank_and_oracle(world4, name):
    _assert_close(world4, "attention", name)


@pytest.mark.parametrize("name", [c.name for c in TP2_CP2_CASES])
def test_tp2_cp2_matches_single_rank_and_oracle(world4, name):
    _assert_close(world4, "tp_attention", name)


def _bytes(results: list[dict], name: str) -> list[tuple[dict, dict]]:
    return [
        (r["forward_bytes"], r["backward_bytes"])
        for rank in results
        for r in rank["bytes"]
        if r["case"] == name
    ]


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_bytes_per_rank_constant_when_n_doubles_with_w_over_r_fixed(world, request):
    results = request.getfixturevalue(world)
    small, large = (_bytes(results, case.name) for case in BYTES_CASES)
    assert small == large
    assert any(fwd for fwd, _ in small), "the case must communicate"


def test_bytes_match_the_dilated_row_count(world2):
    """Causal, CP=2, segment w = N spans both ranks: rank 0 sends its n/r rows per offset, H/r heads each."""
    case = BYTES_CASES[0]
    n, heads, d, itemsize = case.n // 2, case.heads, case.head_dim, 4
    (fwd0, bwd0), (fwd1, bwd1) = _bytes(world2, case.name)
    for pattern, (w, r) in enumerate(zip(case.segment_lengths, case.dilation_rates)):
        expected = 0 if w <= n else 2 * case.batch * n * heads // r * d * itemsize
        assert fwd0.get(pattern, 0) == expected and bwd1.get(pattern, 0) == expected
        assert fwd1.get(pattern, 0) == 0 and bwd0.get(pattern, 0) == 0  # causal: keys only travel forward


def test_patterns_within_the_chunk_communicate_nothing(world2, world4):
    """Every segment of "small_patterns_local" fits in a chunk (w divides n): no bytes at all."""
    for rank in world2 + world4:
        (local,) = [r for r in rank["attention"] if r["case"] == "small_patterns_local"]
        assert not local["forward_bytes"] and not local["backward_bytes"]


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_longnet_gpt_under_cp_matches_cp1(world, request):
    """Same weights and tokens: logits, CP-averaged loss and every parameter gradient as without CP."""
    for rank in request.getfixturevalue(world):
        model = rank["model"]
        assert model["logits"] < TOLERANCE, model
        assert model["loss"] < TOLERANCE * model["loss_value"], model
        assert model["grads"] < TOLERANCE, model
    assert any(rank["model"]["forward_bytes"] for rank in request.getfixturevalue(world))
