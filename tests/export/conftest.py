"""Fixtures of the export tests: two process groups, run once per session, batch every Megatron check.

``saved`` (2 gloo ranks) writes TP=2 and PP=2 checkpoints plus a reshard into one temporary folder;
``converted`` (1 rank) exports them and runs the round trip and the error cases. Tests then compare
results in the pytest process, which never imports Megatron.
"""

from __future__ import annotations

import pytest

from longnet_megatron.testing import ParallelLayout, run_distributed

from . import export_workers as workers


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def saved(workdir) -> list[dict]:
    """Per-rank results of the saving group (rank 0 and rank 1)."""
    return run_distributed(
        workers.saving_worker, 2, layout=ParallelLayout(), args=(str(workdir),), timeout_s=300
    )


@pytest.fixture(scope="session")
def converted(workdir, saved) -> dict:
    """Results of the one-rank conversion group (exports in workdir/hf_*)."""
    return run_distributed(
        workers.conversion_worker, 1, layout=ParallelLayout(), args=(str(workdir),), timeout_s=300
    )[0]


@pytest.fixture(scope="session")
def megatron_logits(saved) -> dict:
    """Case -> Megatron's logits of workers.tokens(0), from the rank that has them."""
    tp2 = saved[0]["tp2"]["logits"]
    last = next(r for r in saved if r["last_stage"])
    return {"tp2": tp2, "pp2": last["pp2"]["logits"]}
