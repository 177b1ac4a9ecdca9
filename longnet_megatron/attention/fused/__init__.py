"""The project's fused dilated attention kernel (Triton): all patterns in one online softmax, strided loads."""

from .launch import (
    FusedDilatedAttention,
    check_inputs,
    fused_backward,
    fused_forward,
)

__all__ = [
    "FusedDilatedAttention",
    "check_inputs",
    "fused_backward",
    "fused_forward",
]
