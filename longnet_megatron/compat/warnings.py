"""The one place that silences other packages' warnings, each for a stated reason.

Our own code raises no warning on the main paths (tests check it); these come from dependencies and
say nothing a user of this project can act on.
"""

from __future__ import annotations

import warnings

# (category, message regex, module regex, why)
_FILTERS = (
    (
        UserWarning,
        r".*(Transformer Engine|Apex|apex).*(not installed|not available|Falling back).*",
        r"megatron\..*",
        "Megatron-Core announces missing optional fused kernels on every CPU import; the fallbacks are "
        "what a CPU run uses by design (GPU runs install TE and get no such warning)",
    ),
    (
        FutureWarning,
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
        r"torch\.distributed\..*",
        "Megatron-Core 0.16's distributed optimizer calls these collectives; the deprecation is for "
        "Megatron to act on",
    ),
    (
        UserWarning,
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
        r".*",
        "Megatron-Core's distributed optimizer tests `.grad` of its fp32 parameter shards, which are "
        "views of the parameters (non-leaf) in fp32 training; it only reads None there",
    ),
    (
        UserWarning,
        r"Apex is not installed\. Falling back to Torch Norm",
        r"megatron\..*",
        "Megatron-Core's layer-norm fallback on machines without Apex",
    ),
    (
        UserWarning,
        r"full scope is deprecated\. Use empty cuda_graph_scope.*",
        r"megatron\..*",
        "Megatron-Core 0.16's TransformerConfig warns about its own default cuda_graph_scope on every "
        "model build (no CUDA graphs are used here)",
    ),
    (
        FutureWarning,
        r"`load_state_dict` is deprecated and will be removed.*",
        r"megatron\..*",
        "Megatron-Core 0.16's dist-checkpoint loader calls torch.distributed.checkpoint's old entry point",
    ),
    (
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor\.",
        r"(torch|longnet_megatron)\..*",
        "torch.distributed.checkpoint warns while Megatron-Core 0.16 loads its ShardedTensors",
    ),
    (
        UserWarning,
        r"Argument aux_data \(position \d+\) cannot be converted to a JitArgument.*",
        r"cutlass\..*",
        "FlashAttention-4 4.0.0b36 passes an argument CuTe DSL cannot type at every kernel compile (the "
        "fa4 backend; seen on the H200, benchmarks/attention_fa4.tests.log); the kernels run as intended",
    ),
)


def quiet_third_party_warnings() -> None:
    """Install the filters above (idempotent); call it at the start of each command-line tool."""
    for category, message, module, _why in _FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
