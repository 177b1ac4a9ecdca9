"""The dependency-light model, the name mapping and generation, without Megatron in the process."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from longnet_megatron.export import LongNetArgs, LongNetForCausalLM, generate
from longnet_megatron.export.cli import main as cli
from longnet_megatron.export.cli import parse_size
from longnet_megatron.export.generate import top_p_filter
from longnet_megatron.export.mapping import hf_to_megatron_state, megatron_to_hf_state
from longnet_megatron.export.megatron_to_hf import write_safetensors
from longnet_megatron.export.plain import load_safetensors_folder

PATTERNS = {"segment_lengths": [8, 16], "dilation_rates": [1, 2], "causal": True, "softmax_scale": None}


def small_args(**changes) -> LongNetArgs:
    fields = dict(
        vocab_size=64,
        tokenizer_vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        dilated_attention=[PATTERNS] * 2,
        max_position_embeddings=32,
    )
    fields.update(changes)
    return LongNetArgs(**fields)


def megatron_like_state(args: LongNetArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under Megatron's local-spec names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    h, d, f = args.hidden_size, args.head_dim, args.intermediate_size
    qkv = (args.num_attention_heads + 2 * args.num_key_value_heads) * d
    fc1 = 2 * f if args.gated_mlp else f
    state = {"embedding.word_embeddings.weight": rand(args.vocab_size, h)}
    for i in range(args.num_hidden_layers):
        p = f"decoder.layers.{i}."
        state.update(
            {
                p + "input_layernorm.weight": rand(h),
                p + "input_layernorm.bias": rand(h),
                p + "self_attention.linear_qkv.weight": rand(qkv, h),
                p + "self_attention.linear_qkv.bias": rand(qkv),
                p + "self_attention.linear_proj.weight": rand(h, h),
                p + "self_attention.linear_proj.bias": rand(h),
                p + "pre_mlp_layernorm.weight": rand(h),
                p + "pre_mlp_layernorm.bias": rand(h),
                p + "mlp.linear_fc1.weight": rand(fc1, h),
                p + "mlp.linear_fc1.bias": rand(fc1),
                p + "mlp.linear_fc2.weight": rand(h, f),
                p + "mlp.linear_fc2.bias": rand(h),
            }
        )
    state["decoder.final_layernorm.weight"] = rand(h)
    state["decoder.final_layernorm.bias"] = rand(h)
    if not args.tie_word_embeddings:
        state["output_layer.weight"] = rand(args.vocab_size, h)
    return state


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"gated_mlp": True, "hidden_act": "silu"},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 1},
        {"num_key_value_heads": 4},
    ],
)
def test_mapping_round_trip_is_exact(changes):
    args = small_args(**changes)
    megatron = megatron_like_state(args)
    hf = megatron_to_hf_state(megatron, args)
    back = hf_to_megatron_state(hf, args)
    assert sorted(back) == sorted(megatron)
    for name, tensor in megatron.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_split_follows_megatrons_per_group_layout():
    # Rows [q_0 q_1 k v] of group 0, then group 1 (2 query heads per kv head).
    args = small_args(num_attention_heads=4, num_key_value_heads=2, head_dim=1, hidden_size=4)
    rows = torch.arange(8.0)[:, None].expand(8, 4).contiguous()
    megatron = megatron_like_state(args)
    megatron["decoder.layers.0.self_attention.linear_qkv.weight"] = rows
    hf = megatron_to_hf_state(megatron, args)
    assert hf["model.layers.0.self_attn.q_proj.weight"][:, 0].tolist() == [0, 1, 4, 5]
    assert hf["model.layers.0.self_attn.k_proj.weight"][:, 0].tolist() == [2, 6]
    assert hf["model.layers.0.self_attn.v_proj.weight"][:, 0].tolist() == [3, 7]


def test_unknown_megatron_tensor_is_an_error_not_a_dropped_weight():
    args = small_args()
    state = megatron_like_state(args)
    state["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(8)
    with pytest.raises(ValueError, match="q_layernorm"):
        megatron_to_hf_state(state, args)


def save_folder(folder, args: LongNetArgs, max_shard_bytes: int = 1 << 40) -> LongNetForCausalLM:
    torch.manual_seed(0)
    model = LongNetForCausalLM(args)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (args.tie_word_embeddings and k == "lm_head.weight")
    }
    write_safetensors(folder, state, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps({"model_type": "longnet", **args.to_dict()}))
    return model.eval()


@pytest.mark.parametrize("max_shard_bytes", [1 << 40, 20_000])
def test_from_pretrained_restores_the_model_and_its_tied_head(tmp_path, max_shard_bytes):
    args = small_args()
    model = save_folder(tmp_path, args, max_shard_bytes)
    loaded = LongNetForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 60, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes < 1 << 40)


def test_sharded_folder_with_a_missing_shard_names_it(tmp_path):
    save_folder(tmp_path, small_args(), 20_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_safetensors_folder(tmp_path)


def test_plain_model_is_causal():
    model = LongNetForCausalLM(small_args()).eval()
    ids = torch.randint(0, 60, (1, 24))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 60
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :12], model(changed)[:, :12])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [True, False, False, False]


def test_generate_greedy_is_argmax_and_respects_vocab_limit_and_eos():
    model = LongNetForCausalLM(small_args()).eval()
    prompt = [1, 2, 3]
    new = generate(model, prompt, 5)
    with torch.no_grad():
        first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    assert new[0] == first
    limited = generate(model, prompt, 20, temperature=1.0, vocab_limit=10, seed=0)
    assert all(t < 10 for t in limited)
    stop = generate(model, prompt, 20, eos_id=first)
    assert stop == [first]


def test_sampling_is_reproducible_with_a_seed():
    model = LongNetForCausalLM(small_args()).eval()
    a = generate(model, [5], 10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, [5], 10, temperature=1.0, top_p=0.9, seed=3)
    assert a == b


@pytest.mark.parametrize(
    ("text", "size"), [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1000", 1000), ("1.5kB", 1500)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


# ---------------------------------------------------------------- on the exported tiny model


def test_sample_cli_greedy_and_top_p(converted, workdir):
    folder = str(workdir / "hf_tp2")
    runner = CliRunner()
    greedy = [
        runner.invoke(cli, ["sample", folder, "--prompt", "def ", "--max-new-tokens", "12"]) for _ in range(2)
    ]
    assert greedy[0].exit_code == 0, greedy[0].output
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.startswith("def ")
    assert "tokens/s" in greedy[0].stderr
    sampled = runner.invoke(
        cli,
        [
            "sample",
            folder,
            "--prompt",
            "def ",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "1",
        ],
    )
    assert sampled.exit_code == 0, sampled.output


def test_sample_cli_names_a_folder_that_is_not_an_export(tmp_path):
    result = CliRunner().invoke(cli, ["sample", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 1
    assert str(tmp_path / "config.json") in result.output
