"""What masked modelling hides and what it must recover: random patch masks, BERT's token masking, and the
pixel targets of masked patches (MAE's normalised patches).

Written by hand: transformers' `DataCollatorForLanguageModeling` masks in the data pipeline with a Bernoulli draw
per token, but the masked family also needs each caption unmasked (for ITC and ITM) in the same batch, and an
exact count per row makes the masking testable. Counts are exact per row; positions are uniform at random.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_vlm.encoders.patches import patchify
from lightning_vlm.tokens import IGNORE_INDEX


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool: exactly round(ratio * N) patches True in every row, chosen uniformly (MAE's per-sample
    shuffle; FLAVA's BEiT masking draws blocks instead, which we leave out)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return _choose(torch.ones(batch, num_patches, dtype=torch.bool, device=device),
                   torch.full((batch,), round(ratio * num_patches), device=device), generator)


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, special_ids: list[int], mask_token_id: int,
                vocab_size: int, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masked language modelling input: round(probability * n) of each row's n real, non-special tokens
    (at least one) are chosen; of those, 80 % become [MASK], 10 % a random token, 10 % stay. Returns the masked
    ids and the labels: the original token where chosen, IGNORE_INDEX everywhere else."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    count = (maskable.sum(dim=1) * probability).round().clamp_min(1)
    chosen = _choose(maskable, count, generator)
    action = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=input_ids.device, generator=generator)
    masked = torch.where(chosen & (action < 0.8), mask_token_id, input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, input_ids.masked_fill(~chosen, IGNORE_INDEX)


def _choose(allowed: Tensor, count: Tensor, generator: torch.Generator | None) -> Tensor:
    """(B, N) bool: min(count[b], allowed[b].sum()) of row b's allowed cells, uniformly at random."""
    noise = torch.rand(allowed.shape, device=allowed.device, generator=generator).masked_fill(~allowed, 2.0)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < count.unsqueeze(1)) & allowed


def pixel_targets(images: Tensor, patch_size: int, eps: float = 1e-6) -> Tensor:
    """MAE's reconstruction target: each patch's pixels normalised by that patch's own mean and std, which
    He et al. (2022) found to give better representations than raw pixels."""
    patches = patchify(images, patch_size)
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()
