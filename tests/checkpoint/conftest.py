"""Fixtures shared with the training tests: the packed dataset and a real training checkpoint."""

from tests.train.conftest import packed_prefix, real_checkpoint, trained_run  # noqa: F401
