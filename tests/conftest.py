"""Suite-wide test settings: GPU-marked tests run only where CUDA is present."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; results are recorded from device runs in benchmarks/")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
