"""Graph-level helper op that decomposed attention calls (kind ``masked_softmax``).

``masked_softmax`` applies an attention mask to the scores Q @ K^T the way ``F.scaled_dot_product_attention``
does (a boolean mask keeps True positions, a float mask is added, ``causal`` keeps the lower triangle), then
the softmax. It is one function so rules keep it float: masked scores hold -inf (or huge negative values)
that no 8-bit scale can share with the scores, and a clamped -inf would give padding positions weight.
"""

from __future__ import annotations

import torch


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Softmax over the last dim of ``scores`` with ``mask`` (bool: keep True; float: added) and, when
    ``causal``, the upper triangle masked."""
    if causal:
        n, s = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(n, s, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1)
