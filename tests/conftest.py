"""Suite-wide test settings: GPU-marked tests run only where CUDA is present.

Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before the
first ``import triton`` (Megatron-Core imports it), since triton.language's own helpers are built then.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; results are recorded from device runs in benchmarks/")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
