"""The reference backend's forward/backward equal autograd through plain softmax attention."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention.backends import ReferenceBackend, get_backend


# Causal calls are square by the backend contract; non-causal ones may be rectangular.
@pytest.mark.parametrize(("causal", "lq", "lk"), [(True, 13, 13), (False, 13, 13), (False, 7, 19)])
def test_backend_matches_autograd(causal, lq, lk):
    gen = torch.Generator().manual_seed(lq * 100 + lk + causal)
    q = torch.randn(3, lq, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(3, lk, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(3, lk, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    dout = torch.randn(3, lq, 2, 8, dtype=torch.float64, generator=gen)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    if causal:
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    want_lse = torch.logsumexp(scores, -1)
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)

    backend = ReferenceBackend(max_scores=2 * lq * lk * 2)  # force batch chunking
    out, lse = backend.forward(q.detach(), k.detach(), v.detach(), causal=causal, scale=0.3)
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse.detach(), rtol=1e-12, atol=1e-12)
    grads = backend.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal=causal, scale=0.3)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_auto_on_cpu_is_reference():
    assert get_backend("auto", torch.zeros(1, 2, 1, 4)).name == "reference"
