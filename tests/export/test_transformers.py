"""The export folder loads through transformers' trust_remote_code and generates like the plain model.

Skipped only when transformers is not installed (it is optional: ``pip install transformers``).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from longnet_megatron.export import LongNetForCausalLM, generate

from . import export_workers as workers

# trust_remote_code copies the modeling files into a module cache that transformers locates when it is
# imported: keep it out of the home directory, and never reach for the network.
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "longnet-export-hf-modules"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="transformers is optional and not installed", exc_type=ImportError
)


@pytest.fixture(scope="module")
def hf_model(converted, workdir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        workdir / "hf_tp2", trust_remote_code=True
    ).eval()


def test_transformers_logits_equal_the_plain_models(hf_model, workdir, megatron_logits):
    inputs, _ = workers.tokens(0)
    with torch.no_grad():
        logits = hf_model(inputs).logits
    plain = LongNetForCausalLM.from_pretrained(workdir / "hf_tp2")
    with torch.no_grad():
        assert torch.equal(logits, plain(inputs))
    torch.testing.assert_close(logits, megatron_logits["tp2"], rtol=1e-5, atol=1e-5)


def test_transformers_generate_matches_greedy_generation(hf_model, workdir):
    prompt = list(b"def ")
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    plain = LongNetForCausalLM.from_pretrained(workdir / "hf_tp2")
    expected = generate(plain, prompt, 10, eos_id=256)
    assert out[0, len(prompt) :].tolist()[: len(expected)] == expected


def test_transformers_loss_is_next_token_cross_entropy(hf_model):
    inputs, _ = workers.tokens(1, batch=1, seq=64)
    with torch.no_grad():
        out = hf_model(inputs, labels=inputs)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], inputs[0, 1:])
    torch.testing.assert_close(out.loss, expected)
