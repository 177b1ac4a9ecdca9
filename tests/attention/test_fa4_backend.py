"""The fa4 backend where no GPU is: listed by name, first in the automatic order (which moves on past
it here), and check() names why it cannot run in one line (its numbers against the oracle are GPU tests, tests/attention/test_gpu_backends.py)."""

from __future__ import annotations

import pytest
import torch

from longnet_megatron.attention import UnsupportedInputError, get_backend
from longnet_megatron.attention.backends import AUTO_ORDER, backend_names
from longnet_megatron.attention.backends.fa4 import FA4Backend, head_dim_reason


def _one_line_reason(backend: FA4Backend, q: torch.Tensor) -> str:
    with pytest.raises(UnsupportedInputError) as err:
        backend.check(q)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_fa4_leads_the_automatic_order_and_auto_moves_past_it_where_it_cannot_run():
    assert "fa4" in backend_names()
    assert AUTO_ORDER[0] == "fa4"
    q = torch.zeros(1, 8, 2, 64)
    assert get_backend("auto", q).name == "reference"  # on CPU (or without flash-attn-4) auto moves on
    assert get_backend("auto", q.to(torch.bfloat16), documents=True).name == "reference"


def test_check_names_the_missing_library_or_the_device():
    backend = get_backend("fa4")
    assert isinstance(backend, FA4Backend)
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    message = _one_line_reason(backend, q)
    if backend.missing is not None:
        assert message.startswith("flash-attn-4 is not installed")
    else:
        assert "needs a CUDA device with compute capability 9.0 or 10.x" in message
    with pytest.raises(UnsupportedInputError, match="flash-attn-4|compute capability"):
        get_backend("fa4", q, documents=True)


def test_check_on_cpu_names_the_device_when_the_library_is_there(monkeypatch):
    backend = FA4Backend()
    monkeypatch.setattr(backend, "missing", None)
    message = _one_line_reason(backend, torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16))
    assert message == "fa4 backend needs a CUDA device with compute capability 9.0 or 10.x, got device cpu"


@pytest.mark.parametrize(
    ("head_dim", "major", "ok"),
    [(8, 9, True), (128, 9, True), (200, 9, True), (256, 9, True), (264, 9, False), (12, 9, False),
     (128, 10, True), (192, 10, False), (256, 10, True), (12, 10, False)],
)  # fmt: skip
def test_head_dim_limits_follow_the_architecture(head_dim, major, ok):
    reason = head_dim_reason(head_dim, major)
    assert (reason is None) == ok
    if not ok:
        assert f"got {head_dim}" in reason
