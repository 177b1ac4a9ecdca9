#!/usr/bin/env python
"""Check the Transformer Engine LongNet spec against the local spec on one GPU (bf16).

Builds the same preset twice, with Megatron's local layers and with TE layers, copies the local
weights into the TE model (TE fuses each layernorm into the following linear, so
``input_layernorm.*`` becomes ``self_attention.linear_qkv.layer_norm_*`` and ``pre_mlp_layernorm.*``
becomes ``mlp.linear_fc1.layer_norm_*``), runs forward + backward in bf16 on CUDA, and prints the
logits and gradient differences and the step times. Exits 1 when the logits differ by more than
``--rtol`` (relative to the largest logit) or anything is not finite, 2 when it cannot run (no CUDA or
no TE).

    python tools/check_te_spec.py --preset 125m --seq-length 8192 --batch 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="125m", help="model preset (tiny, 125m, ... 2.7b)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--seq-length", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--backend", default="auto", help="dilated attention backend for both models")
    parser.add_argument("--rtol", type=float, default=2e-2, help="max |logits diff| / max |logits| allowed")
    parser.add_argument("--iters", type=int, default=5, help="timed fwd+bwd steps per model")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def init_single_gpu(seed: int) -> None:
    """One-rank NCCL group and Megatron parallel state (TP = PP = CP = 1)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from longnet_megatron.parallel.layout import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)


def step(model, tokens, labels):
    """Forward (logits and loss) and backward; returns detached logits and the loss."""
    import torch

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    return logits.float(), loss.detach()


def time_steps(model, tokens, labels, iters: int) -> float:
    """Mean seconds of one forward + backward (after one warm-up step)."""
    import torch

    step(model, tokens, labels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step(model, tokens, labels)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / max(iters, 1)


def main(argv: list[str] | None = None) -> int:
    """Build both specs on identical weights, compare, time; return the exit status."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("check_te_spec: needs a CUDA device", file=sys.stderr)
        return 2
    from longnet_megatron.model import build_longnet_gpt, get_preset
    from longnet_megatron.model.specs import transformer_engine_available
    from longnet_megatron.model.state_dict import rename_local_to_te, tensors_only

    if not transformer_engine_available():
        print("check_te_spec: Transformer Engine does not import", file=sys.stderr)
        return 2
    init_single_gpu(args.seed)
    preset = get_preset(args.preset)
    changes = {"seq_length": max(preset.seq_length, args.seq_length)}
    if args.num_layers is not None:
        changes["num_layers"] = args.num_layers
    preset = preset.replace(**changes)
    common = {"bf16": True, "attention_backend_name": args.backend}
    local = build_longnet_gpt(preset, use_te=False, **common).cuda()
    te = build_longnet_gpt(preset, use_te=True, **common).cuda()

    weights = rename_local_to_te(tensors_only(local.state_dict()))
    missing, unexpected = te.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        print(f"weight mapping failed: missing {missing}, unexpected {unexpected}", file=sys.stderr)
        return 1

    # bf16 the way the trainer runs it: Megatron's Float16Module casts parameters (the local spec's
    # torch LayerNorm is created in float32) and returns float32 logits.
    from megatron.core.transformer.module import Float16Module

    local_run, te_run = Float16Module(local.config, local), Float16Module(te.config, te)

    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    data = torch.randint(
        0, preset.vocab_size, (args.batch, args.seq_length + 1), device="cuda", generator=gen
    )
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    local_logits, local_loss = step(local_run, tokens, labels)
    te_logits, te_loss = step(te_run, tokens, labels)
    diff = (te_logits - local_logits).abs()
    max_abs = diff.max().item()
    rel = max_abs / max(local_logits.abs().max().item(), 1e-12)
    local_grads = rename_local_to_te({n: p.grad for n, p in local.named_parameters() if p.grad is not None})
    te_grads = {n: p.grad for n, p in te.named_parameters() if p.grad is not None}
    grad_rel = max(
        ((te_grads[n].float() - g.float()).abs().max() / g.float().abs().max().clamp_min(1e-12)).item()
        for n, g in local_grads.items()
    )
    finite = bool(torch.isfinite(te_logits).all() and torch.isfinite(te_loss))

    local_s = time_steps(local_run, tokens, labels, args.iters)
    te_s = time_steps(te_run, tokens, labels, args.iters)
    print(f"preset={preset.name} layers={preset.num_layers} batch={args.batch} seq={args.seq_length} bf16")
    print(f"logits  max|diff|={max_abs:.4e}  rel={rel:.4e}  (tolerance {args.rtol:.1e})")
    print(f"loss    local={local_loss.item():.6f}  te={te_loss.item():.6f}")
    print(f"grads   max rel diff over {len(local_grads)} tensors = {grad_rel:.4e}")
    print(f"fwd+bwd local={local_s * 1e3:.1f} ms  te={te_s * 1e3:.1f} ms  (mean of {args.iters})")
    ok = finite and rel <= args.rtol
    print("OK" if ok else "MISMATCH")
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
