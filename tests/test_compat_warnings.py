"""compat.warnings: each filter silences exactly its dependency's warning, nothing else."""

from __future__ import annotations

import warnings

from longnet_megatron.compat.warnings import quiet_third_party_warnings


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)
    return bool(caught)


def test_fa4_compile_warning_is_silenced_and_other_cutlass_warnings_are_not():
    aux = (
        "Argument aux_data (position 17) cannot be converted to a JitArgument for function "
        "'cutlass___call___flash_attncuteflash_fwd_sm90'. Its type is not supported."
    )
    assert not _shown(aux, UserWarning, "cutlass.base_dsl.dsl")
    assert _shown(aux, UserWarning, "longnet_megatron.attention.backends.fa4")  # only from cutlass
    assert _shown("Argument x cannot be converted", UserWarning, "cutlass.base_dsl.dsl")


def test_megatron_fallback_notice_is_silenced_only_from_megatron():
    notice = "Transformer Engine and Apex are not installed. Falling back to local implementations"
    assert not _shown(notice, UserWarning, "megatron.core.optimizer.clip_grads")
    assert _shown(notice, UserWarning, "somewhere.else")
