"""BERT/IRRA token masking for the masked-language-modelling (MLM) objective."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

#: Label of positions that the MLM loss ignores (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

_MASK_SHARE = 0.8  # of the selected tokens: 80 % -> mask token
_RANDOM_SHARE = 0.1  # 10 % -> random non-special token; the remaining 10 % keep their id


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Collection[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Select `probability` of the non-special tokens; replace 80 % of them by the mask token, 10 % by a random
    non-special token and leave 10 % unchanged (BERT, arXiv 1810.04805; IRRA).

    Every row (last dimension) that holds at least one non-special token gets at least one selected token, so no
    caption is wasted for the MLM loss.

    Args:
        input_ids: Token ids; the last dimension is the sequence.
        mask_token_id: Id written at 80 % of the selected positions.
        vocab_size: Random replacements are drawn from `range(vocab_size)` minus `special_token_ids`.
        special_token_ids: Ids never selected nor drawn (pad, eos, bos, mask, ...).
        probability: Selection rate in (0, 1].
        generator: Source of randomness, for reproducible masking; it must live on `input_ids.device`.

    Returns:
        `(masked_input_ids, labels)`: labels hold the original id at selected positions and `IGNORE_INDEX`
        elsewhere.

    Raises:
        ValueError: On a probability outside (0, 1], a mask id outside the vocabulary, or a vocabulary made only of
            special tokens.

    Shapes:
        input_ids: (..., L) long -> ((..., L), (..., L))
    """
    if not 0 < probability <= 1:
        raise ValueError(f"mask_tokens: probability={probability} must lie in (0, 1]; fix the MLM probability.")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_tokens: mask_token_id={mask_token_id} is outside the vocabulary of {vocab_size}.")
    device = input_ids.device
    specials = torch.tensor(sorted(special_token_ids), dtype=torch.long, device=device)
    is_ordinary = torch.ones(vocab_size, dtype=torch.bool, device=device)
    is_ordinary[specials[(specials >= 0) & (specials < vocab_size)]] = False
    ordinary_ids = is_ordinary.nonzero().squeeze(1)
    if ordinary_ids.numel() == 0:
        raise ValueError(f"mask_tokens: all {vocab_size} ids are special; no random replacement can be drawn.")

    candidates = ~torch.isin(input_ids, specials)
    selected = (torch.rand(input_ids.shape, generator=generator, device=device) < probability) & candidates

    # At-least-one rule: in rows with a candidate but no selection, select the candidate with the highest score.
    scores = torch.rand(input_ids.shape, generator=generator, device=device).masked_fill(~candidates, -1.0)
    forced = torch.zeros_like(selected).scatter_(-1, scores.argmax(dim=-1, keepdim=True), True)
    needs_one = candidates.any(dim=-1, keepdim=True) & ~selected.any(dim=-1, keepdim=True)
    selected |= forced & needs_one

    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = selected & (action < _MASK_SHARE)
    to_random = selected & (action >= _MASK_SHARE) & (action < _MASK_SHARE + _RANDOM_SHARE)
    random_ids = ordinary_ids[torch.randint(ordinary_ids.numel(), input_ids.shape, generator=generator, device=device)]

    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return masked, labels
