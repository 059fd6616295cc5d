"""Choose which of bitsandbytes' CPU code paths the tests take, whatever this CPU has.

bitsandbytes 0.50 decides in ``Linear4bit.__init__``, from ``has_avx512bf16()``, whether a
4-bit layer may repack its weight for AVX512-BF16 inference. ``LIGHTNING_PEFT_AVX512BF16=on``
makes every layer built afterwards believe the instruction is there (as far as the layers can
run without it: the package keeps them on the standard path), ``off`` that it is missing;
unset, the CPU decides. ``make test-cpu-paths`` runs the affected tests both ways.
"""

from __future__ import annotations

import os

ENV = "LIGHTNING_PEFT_AVX512BF16"


def force_avx512bf16(present: bool) -> None:
    """Make bitsandbytes' 4-bit layers built from now on see AVX512-BF16 as ``present``."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    def answer() -> bool:
        return present

    bitsandbytes.functional.has_avx512bf16 = answer
    bitsandbytes.nn.modules.has_avx512bf16 = answer


def apply_from_environment() -> str:
    """Apply ``$LIGHTNING_PEFT_AVX512BF16`` (``on``, ``off`` or unset); returns what applies."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", "on", "off"):
        raise ValueError(f"{ENV} must be 'on', 'off' or unset, got {value!r}")
    if value:
        force_avx512bf16(value == "on")
        return value
    import bitsandbytes.functional

    return "on (this CPU)" if bitsandbytes.functional.has_avx512bf16() else "off (this CPU)"
