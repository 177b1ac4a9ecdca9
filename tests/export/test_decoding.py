"""Cached decoding of the exported model: the plain model, generate, the CLI and transformers' generate.

Every check compares against the full forward (or uncached generation) of the same weights. Patterns
are tiny (w = 4 .. 22) so that a few dozen tokens cross segment ends of every pattern; the models have
GQA, ragged patterns, and different patterns per layer. No Megatron in this process.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from click.testing import CliRunner

from longnet_megatron.export import LongNetArgs, LongNetForCausalLM, generate, plain
from longnet_megatron.export.cli import main as cli
from longnet_megatron.export.generate import generate_timed, prefill
from longnet_megatron.export.megatron_to_hf import write_hf_folder

from .test_plain_model import small_args

GEOMETRIC = {
    "segment_lengths": [4, 8, 16],
    "dilation_rates": [1, 2, 4],
    "causal": True,
    "softmax_scale": None,
}
RAGGED = {"segment_lengths": [4, 9, 22], "dilation_rates": [1, 2, 7], "causal": True, "softmax_scale": None}


def decode_args(**changes) -> LongNetArgs:
    """Byte-sized vocabulary (the bytes tokenizer), GQA 6:2, a geometric and a ragged layer."""
    fields = dict(vocab_size=320, tokenizer_vocab_size=257, hidden_size=48, intermediate_size=96,
                  num_attention_heads=6, dilated_attention=[GEOMETRIC, RAGGED], max_position_embeddings=96,
                  attention_backend="reference")  # fmt: skip
    return small_args(**{**fields, **changes})


def tiny_model(seed: int = 0, **changes) -> LongNetForCausalLM:
    torch.manual_seed(seed)
    return LongNetForCausalLM(decode_args(**changes)).eval()


def ids(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("changes", "calls"),
    [
        ({}, [1] * 60),  # one token at a time from the first
        ({}, [23] + [1] * 37),  # a prefill, then tokens
        ({}, [17, 3, 1, 4, 2, 5, 1, 20, 7]),  # speculative-sized calls and a second prefill
        ({"dilated_attention": [RAGGED, RAGGED], "num_key_value_heads": 3}, [9, 1, 1, 2, 30, 1, 16]),
        (
            {"num_key_value_heads": 6, "gated_mlp": True, "hidden_act": "silu", "normalization": "RMSNorm"},
            [5] * 12,
        ),
    ],
)
def test_cached_logits_equal_the_full_forward_at_every_position(changes, calls):
    model = tiny_model(**changes)
    tokens = ids(2, sum(calls))
    cache = model.new_cache()
    with torch.no_grad():
        full = model(tokens)
        pieces, start = [], 0
        for size in calls:
            pieces.append(model(tokens[:, start : start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == sum(calls)


def test_chunked_prefill_leaves_the_cache_of_one_forward():
    model = tiny_model()
    tokens = ids(2, 70)
    with torch.no_grad():
        full = model(tokens)
        for chunk in (7, 70):
            cache = model.new_cache()
            last = prefill(model, tokens[:, :60], cache, chunk)
            torch.testing.assert_close(last, full[:, 59], rtol=1e-5, atol=1e-5)
            rest = model(tokens[:, 60:], cache)
            torch.testing.assert_close(rest, full[:, 60:], rtol=1e-5, atol=1e-5)


def test_cache_memory_does_not_grow_with_the_context():
    model = tiny_model(max_position_embeddings=400)
    tokens = ids(1, 400)
    cache = model.new_cache()
    sizes = []
    with torch.no_grad():
        for start in range(0, 400, 50):
            model(tokens[:, start : start + 50], cache)
            sizes.append(cache.stats().bytes)
    stats = cache.stats()
    assert len(set(sizes)) == 1 and stats.bytes < stats.dense_bytes / 5
    assert stats.key_bound == 4 + 5 + 4  # the ragged layer: ceil(4/1) + ceil(9/2) + ceil(22/7); layer 0: 12


def test_generate_with_the_cache_gives_the_tokens_without_it():
    model = tiny_model()
    prompt = ids(1, 11, seed=4)[0].tolist()
    cached = generate_timed(model, prompt, 24, vocab_limit=257)
    uncached = generate_timed(model, prompt, 24, vocab_limit=257, use_cache=False)
    assert cached.tokens == uncached.tokens and len(cached.tokens) == 24
    assert cached.cache.tokens == 11 + 23 and uncached.cache is None
    assert cached.decode_tokens_per_s > 0 and "tokens/s" in cached.summary()
    sampled = [
        generate(model, prompt, 16, temperature=0.9, top_p=0.8, seed=2, use_cache=c) for c in (True, False)
    ]
    assert sampled[0] == sampled[1]
    assert generate(model, prompt, 16, prefill_chunk=4) == cached.tokens[:16]


def test_bad_generation_arguments_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, [1, 2], 0)
    with pytest.raises(ValueError, match="max_new_tokens=-5"):
        generate(model, [1, 2], -5)
    with pytest.raises(ValueError, match="temperature=nan"):
        generate(model, [1, 2], 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="need 100 positions; the model has 96"):
        generate(model, list(range(97)), 4)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 4)


def test_a_foreign_cache_and_positions_past_the_limit_are_clear_errors():
    model = tiny_model()
    other = tiny_model(dilated_attention=[RAGGED, GEOMETRIC])
    tokens = ids(1, 10)
    with torch.no_grad():
        with pytest.raises(ValueError, match="another model or layout .*dilated_attention"):
            model(tokens, other.new_cache())
        with pytest.raises(ValueError, match="its own cache"):
            model(tokens, cache={"not": "a cache"})
        cache = model.new_cache()
        with pytest.raises(ValueError, match="not both"):
            model(tokens, cache, past_key_values=model.new_cache())
        model(tokens, past_key_values=cache)  # the older name works alone
        assert cache.get_seq_length() == 10
        model(ids(1, 86), cache)
        with pytest.raises(ValueError, match="positions 96..96 pass the model's position limit"):
            model(tokens[:, :1], cache)
        assert cache.get_seq_length() == 96
        with pytest.raises(ValueError, match="batch 1"):
            model(ids(2, 1), model_cache_after(model, 3))


def model_cache_after(model: LongNetForCausalLM, n: int):
    cache = model.new_cache()
    model(ids(1, n), cache)
    return cache


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """A tiny export (bytes tokenizer, GQA, ragged patterns) written as longnet-convert writes one."""
    model = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path_factory.mktemp("decode") / "tiny"
    write_hf_folder(folder, decode_args(), state, {"tokenizer": {"kind": "bytes"}})
    return folder


def test_sample_decodes_with_the_cache_and_prints_tokens_per_second(export_folder):
    runner = CliRunner()
    base = ["sample", str(export_folder), "--prompt", "def f(x):", "--max-new-tokens", "24"]
    cached = runner.invoke(cli, base)
    uncached = runner.invoke(cli, [*base, "--no-cache"])
    chunked = runner.invoke(cli, [*base, "--prefill-chunk", "3"])
    assert cached.exit_code == 0, cached.output
    assert cached.stdout.startswith("def f(x):") and cached.stdout == uncached.stdout == chunked.stdout
    assert "tokens/s" in cached.stderr and "cache" in cached.stderr and "cache" not in uncached.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-new-tokens", "-5", "-5 is not in the range x>=1"),
        ("--max-new-tokens", "0", "0 is not in the range x>=1"),
        ("--temperature", "nan", "nan is not a finite number"),
        ("--temperature", "-1", "-1.0 is not in the range x>=0"),
        ("--top-p", "nan", "nan is not a finite number"),
        ("--top-p", "0", "0.0 is not in the range 0<x<=1"),
        ("--device", "gpu7", "'gpu7' is not a device"),
        ("--prefill-chunk", "0", "0 is not in the range x>=1"),
    ],
)
def test_sample_rejects_bad_options_in_one_line(tmp_path, option, value, message):
    result = CliRunner().invoke(cli, ["sample", str(tmp_path), "--prompt", "x", option, value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Error: Invalid value for '{option}': {message}" in result.output


def test_sample_on_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli, ["sample", str(tmp_path), "--prompt", "x", "--device", "cuda"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: Invalid value for '--device': 'cuda': no CUDA GPU is available here" in result.output


def test_sample_refuses_a_prompt_past_the_position_limit(export_folder):
    result = CliRunner().invoke(
        cli, ["sample", str(export_folder), "--prompt", "x" * 90, "--max-new-tokens", "10"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "need 99 positions; the model has 96" in result.output


# ---------------------------------------------------------------- transformers

os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "longnet-export-hf-modules"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_model(export_folder):
    transformers = pytest.importorskip("transformers", exc_type=ImportError)
    return transformers.AutoModelForCausalLM.from_pretrained(export_folder, trust_remote_code=True).eval()


def test_transformers_generate_with_the_cache_gives_the_tokens_without_it(hf_model):
    prompt = ids(2, 9, seed=7)
    cached = hf_model.generate(prompt, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    uncached = hf_model.generate(prompt, max_new_tokens=30, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, uncached) and uncached.shape == (2, 39)
    assert type(cached.cache).__name__ == "LongNetHFCache" and cached.cache.get_seq_length() == 38
    chunked = hf_model.generate(prompt, max_new_tokens=30, do_sample=False, prefill_chunk_size=4)
    assert torch.equal(chunked, uncached)
    beams = [hf_model.generate(prompt, max_new_tokens=12, num_beams=3, use_cache=c) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])


def test_transformers_speculative_decoding_crops_the_cache_exactly(hf_model, monkeypatch):
    # Prompt lookup drafts several tokens per step, verifies them in one call and crops the rejected
    # ones: the cache records emptied segments and rolls back across segment ends.
    crossed = []
    crop = plain.LongNetCache.crop

    def counting_crop(cache, tokens_to_remove):
        before = cache.get_seq_length()
        crop(cache, tokens_to_remove)
        after = cache.get_seq_length()
        crossed.append((before - 1) // 4 != (after - 1) // 4)  # past an end of the w = 4 segments

    monkeypatch.setattr(plain.LongNetCache, "crop", counting_crop)
    prompt = torch.tensor([[5, 6, 7, 8, 9] * 3])
    drafted = hf_model.generate(prompt, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=6)
    monkeypatch.undo()
    greedy = hf_model.generate(prompt, max_new_tokens=40, do_sample=False)  # = uncached: tested above
    assert torch.equal(drafted, greedy)
    assert any(crossed)


def test_transformers_forward_takes_and_returns_the_cache(hf_model, export_folder):
    tokens = ids(1, 30, seed=9)
    plain_model = LongNetForCausalLM.from_pretrained(export_folder, attention_backend="reference")
    with torch.no_grad():
        full = plain_model(tokens)
        first = hf_model(tokens[:, :20], use_cache=True)
        again = hf_model(tokens[:, 20:], past_key_values=first.cache)
        assert again.cache is first.cache and first.cache.get_seq_length() == 30
        torch.testing.assert_close(torch.cat([first.logits, again.logits], 1), full, rtol=1e-5, atol=1e-5)
        last = hf_model(tokens, use_cache=True, logits_to_keep=1)
        torch.testing.assert_close(last.logits, full[:, -1:], rtol=1e-5, atol=1e-5)
        transformers = pytest.importorskip("transformers")
        with pytest.raises(ValueError, match="its own cache"):
            hf_model(tokens, cache=transformers.DynamicCache())
        with pytest.raises(ValueError, match="its own cache"):
            hf_model.generate(tokens, max_new_tokens=2, past_key_values=transformers.DynamicCache())


def test_transformers_training_forward_keeps_its_gradients(hf_model):
    # The config's use_cache applies to inference: with gradients on, the default runs without a
    # cache (which would detach attention), and an explicit cache is refused.
    tokens = ids(1, 24, seed=11)
    hf_model.zero_grad()
    out = hf_model(tokens, labels=tokens)
    assert out.cache is None
    out.loss.backward()
    assert hf_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    hf_model.zero_grad()
    with pytest.raises(ValueError, match="for inference"):
        hf_model(tokens, use_cache=True)
