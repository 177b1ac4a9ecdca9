"""LongNet's distributed dilated attention on 2 and 4 gloo ranks against one process and the oracle.

One process group of 4 ranks (a module fixture) runs every case of ``checks.py``; the tests below
assert on its results: outputs and dq, dk, dv within float32 tolerance for patterns smaller and larger
than the chunk, causal and not, ragged segments, GQA, TP=2 x CP=2, CP=3, document masking with
documents crossing rank boundaries; the bytes a rank sends; and the LongNet GPTModel's logits, loss
and gradients under CP against CP=1.
"""

from __future__ import annotations

import pytest

from longnet_megatron.testing import ParallelLayout, run_distributed

from .checks import BYTES_CASES, CP2_CASES, CP3_CASES, CP4_CASES, TP2_CP2_CASES, run_all

TOLERANCE = 1e-5  # relative, float32
BF16_TOLERANCE = 2e-2  # bf16 inputs and outputs vs the float32 single-rank run
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(run_all, 4, layout=ParallelLayout(cp=4))


def _results(ranks: list[dict], key: str, name: str) -> list[dict]:
    found = [r for rank in ranks for r in rank[key] if r["case"] == name]
    assert found, f"no results for {key}/{name}"
    return found


def _assert_close(ranks: list[dict], key: str, name: str) -> None:
    tol = BF16_TOLERANCE if name.startswith("bf16") else TOLERANCE
    for result in _results(ranks, key, name):
        for what, err in result["errors"].items():
            assert err < tol, (
                f"{name} cp_rank={result['cp_rank']} tp_rank={result['tp_rank']}: {what} relative error "
                f"{err:.2e}"
            )


@pytest.mark.parametrize("name", [c.name for c in CP2_CASES])
def test_cp2_matches_single_rank_and_oracle(ranks, name):
    _assert_close(ranks, "cp2", name)


@pytest.mark.parametrize("name", [c.name for c in CP4_CASES])
def test_cp4_matches_single_rank_and_oracle(ranks, name):
    _assert_close(ranks, "cp4", name)


@pytest.mark.parametrize("name", [c.name for c in CP3_CASES])
def test_cp3_matches_single_rank_and_oracle(ranks, name):
    _assert_close(ranks, "cp3", name)


@pytest.mark.parametrize("name", [c.name for c in TP2_CP2_CASES])
def test_tp2_cp2_matches_single_rank_and_oracle(ranks, name):
    _assert_close(ranks, "tp2_cp2", name)


def _bytes_by_cp_rank(ranks: list[dict], key: str, name: str) -> dict[int, tuple[dict, dict]]:
    """cp_rank -> (forward bytes by pattern, backward bytes by pattern); replicas must agree."""
    table: dict[int, tuple[dict, dict]] = {}
    for r in _results(ranks, key, name):
        entry = (r["forward_bytes"], r["backward_bytes"])
        assert table.setdefault(r["cp_rank"], entry) == entry
    return table


@pytest.mark.parametrize("key", ["bytes_cp2", "bytes_cp4"])
def test_bytes_per_rank_constant_when_n_doubles_with_w_over_r_fixed(ranks, key):
    small, large = (_bytes_by_cp_rank(ranks, key, case.name) for case in BYTES_CASES)
    assert small == large
    assert any(fwd for fwd, _ in small.values()), "the case must communicate"


def test_bytes_match_the_dilated_row_count(ranks):
    """Causal, CP=2, segment w >= N spans both ranks: rank 0 sends its n/r rows per offset, H/r heads each."""
    case = BYTES_CASES[0]
    n, heads, d, itemsize = case.n // 2, case.heads, case.head_dim, 4
    table = _bytes_by_cp_rank(ranks, "bytes_cp2", case.name)
    (fwd0, bwd0), (fwd1, bwd1) = table[0], table[1]
    for pattern, (w, r) in enumerate(zip(case.segment_lengths, case.dilation_rates)):
        expected = 0 if w <= n else 2 * case.batch * n * heads // r * d * itemsize
        assert fwd0.get(pattern, 0) == expected and bwd1.get(pattern, 0) == expected
        assert fwd1.get(pattern, 0) == 0 and bwd0.get(pattern, 0) == 0  # causal: keys only travel forward


@pytest.mark.parametrize("key", ["cp2", "cp4"])
def test_patterns_within_the_chunk_communicate_nothing(ranks, key):
    """Every segment of "small_patterns_local" fits in a chunk (w divides n): no bytes at all."""
    for result in _results(ranks, key, "small_patterns_local"):
        assert not result["forward_bytes"] and not result["backward_bytes"]


@pytest.mark.parametrize(
    "key", ["model_cp2", "model_tp2_cp2", "model_cp2_documents", "model_tp2_cp2_documents"]
)
def test_longnet_gpt_under_cp_matches_cp1(ranks, key):
    """Same weights and tokens: logits, CP-averaged loss and every parameter gradient as without CP."""
    for rank in ranks:
        model = rank[key]
        assert model["logits"] < TOLERANCE, model
        assert model["loss"] < TOLERANCE * model["loss_value"], model
        assert model["grads"] < TOLERANCE, model
    assert any(rank[key]["forward_bytes"] for rank in ranks), "the model's largest pattern must cross ranks"
    if key.endswith("_documents"):  # the masking takes effect: not the unmasked model's loss
        unmasked = ranks[0][key.removesuffix("_documents")]["loss_value"]
        assert abs(ranks[0][key]["loss_value"] - unmasked) > 1e-4
