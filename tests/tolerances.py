"""How close two computations of the same float values must be, from dtype, depth and size.

Merged and unmerged adapters, a batch and its rows, two CPUs: the same maths in another
order of operations. Each floating-point operation rounds by up to eps/2 of its result; a
dot product over ``width`` terms accumulates about sqrt(width) such errors; ``depth`` layers
in sequence add theirs (and each layer can amplify what it receives); and all of it scales
with the size of the values compared. ``HEADROOM`` covers what differs between machines:
BLAS blocking, FMA or not, AVX2 against AVX-512 accumulation (measured: 3.1e-4 on a merged
export whose bound here is 1.3e-3). A real bug (a missing update, a double merge) moves
these values by 1e-2 to 1e1.
"""

from __future__ import annotations

import math

import torch

HEADROOM = 64


def reordering_tolerance(
    reference: torch.Tensor, *, depth: int, width: int, dtype: torch.dtype | None = None
) -> dict[str, float]:
    """``assert_close`` keywords for values that equal ``reference`` up to rounding."""
    eps = torch.finfo(dtype or reference.dtype).eps
    scale = float(reference.detach().abs().max())
    return {"rtol": 0.0, "atol": HEADROOM * eps * math.sqrt(width) * depth * scale}


def eight_bit_adam_tolerance(*, lr: float, steps: int) -> dict[str, float]:
    """``assert_close`` keywords for adapters trained ``steps`` steps by bitsandbytes' 8-bit
    Adam from gradients that equal up to rounding (DDP's all-reduce against one process).

    Each Adam state is stored as one of 256 levels of bitsandbytes' dynamic map, relative to
    its block's absmax: a last-bit difference in a gradient can put a state on the
    neighbouring level, which moves that step's update (about ``lr`` in size) by up to the
    map's widest gap between neighbouring levels, for each of the two states. A real bug (a
    missing or doubled update) moves a value by about ``lr``.
    """
    import bitsandbytes.functional as F

    levels = F.create_dynamic_map(signed=True).sort().values
    gap = float((levels[1:] - levels[:-1]).max())
    return {"rtol": 0.0, "atol": steps * lr * 2 * gap}
