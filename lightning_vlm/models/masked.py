"""What FLAVA and MaskVLM share: masking both modalities of a batch, the image target (normalised pixels or an
image tokenizer's codes), prediction heads, named masked predictions, and the reconstruction shown in TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_vlm.encoders import TextEncoder, TextOutput, VisionEncoder, VisionOutput
from lightning_vlm.encoders.patches import patchify, unpatchify
from lightning_vlm.models.contrastive import ContrastiveOutput
from lightning_vlm.models.masking import mask_tokens, pixel_targets, random_patch_mask


@dataclass
class MaskedPrediction:
    """pred: (B, N, V) logits or (B, N, T) values at every position; target: (B, N) class ids or (B, N, T)
    values; mask: (B, N) bool, the positions the loss counts (those that were masked)."""

    pred: Tensor
    target: Tensor
    mask: Tensor


@dataclass
class MaskedModelingOutput:
    """predictions: named masked predictions ("mlm", "mim", ...); contrastive: the unmasked pair's embeddings
    (with hard negatives) for the global contrastive loss; itm_logits (N, 2) and itm_labels (N,) 0/1. A
    unimodal batch has predictions only."""

    predictions: dict[str, MaskedPrediction]
    contrastive: ContrastiveOutput | None = None
    itm_logits: Tensor | None = None
    itm_labels: Tensor | None = None


@dataclass
class MaskedPair:
    """A batch encoded with masked inputs: image (its masked patches in ``image.patch_mask``), text from masked
    ids, and ``mlm_labels`` (B, L): the original token at masked positions, IGNORE_INDEX elsewhere."""

    image: VisionOutput
    text: TextOutput
    mlm_labels: Tensor


class PatchColourTokenizer(nn.Module):
    """A parameter-free image tokenizer: each patch's mean colour quantised to `levels` per channel, giving
    levels ** 3 codes (iGPT's colour-palette idea, per patch). An example of the `image_tokenizer` slot, which
    takes any module mapping (B, 3, H, W) images to (B, N) codes aligned with the encoder's patches and
    declaring ``vocab_size`` (a dVAE's, as BEiT and FLAVA use, fits the same slot).
    """

    def __init__(self, patch_size: int, levels: int = 4, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        self.patch_size, self.levels = patch_size, levels
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.levels**3

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, N) codes in [0, levels ** 3)."""
        colours = patchify((pixel_values * self.std + self.mean).clamp(0, 1), self.patch_size)
        colours = colours.unflatten(-1, (-1, 3)).mean(dim=2)  # (B, N, 3) mean RGB of each patch
        digits = (colours * self.levels).long().clamp(max=self.levels - 1)
        return (digits * torch.tensor([self.levels**2, self.levels, 1], device=digits.device)).sum(-1)


@dataclass
class MaskingConfig:
    """How a masked model masks: `mask_ratio` of each image's patches, BERT masking of `text_mask_probability`
    of each caption's tokens, and the image target: `image_tokenizer`'s codes when given, else the patches'
    normalised pixels (MAE)."""

    mask_ratio: float = 0.4
    text_mask_probability: float = 0.15
    image_tokenizer: nn.Module | None = None


class Masking(nn.Module):
    """Masks a batch for masked modelling (see `MaskingConfig`) and gives the image target: masked patches take
    the vision encoder's mask token, masked tokens follow BERT."""

    def __init__(self, vision: VisionEncoder, text: TextEncoder, config: MaskingConfig | None = None) -> None:
        super().__init__()
        config = config or MaskingConfig()
        if vision.mask_token is None:
            raise ValueError("masked image modelling needs VisionEncoder(mask_token=True)")
        tokenizer = text.tokenizer
        if tokenizer is None or tokenizer.mask_token_id is None:
            raise ValueError("masked language modelling needs a text encoder whose tokenizer has a mask token")
        self.mask_ratio, self.text_mask_probability = config.mask_ratio, config.text_mask_probability
        self.patch_size = vision.patch_size
        self.mask_token_id, self.special_ids = tokenizer.mask_token_id, list(tokenizer.all_special_ids)
        self.vocab_size = text.model.config.vocab_size
        self.image_tokenizer = config.image_tokenizer
        if self.image_tokenizer is not None:
            self.image_tokenizer.requires_grad_(False)

    @property
    def target_dim(self) -> int:
        """Width of a patch prediction: the tokenizer's codes, else p * p * 3 pixel values."""
        if self.image_tokenizer is not None:
            return self.image_tokenizer.vocab_size
        return self.patch_size**2 * 3

    def forward(self, vision: VisionEncoder, text: TextEncoder, pixel_values: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> MaskedPair:
        """Encode the batch with masked patches and masked tokens."""
        masked_ids, labels = self.mask_text(input_ids, attention_mask)
        return MaskedPair(vision(pixel_values, self.patch_mask(pixel_values)), text(masked_ids, attention_mask), labels)

    def patch_mask(self, pixel_values: Tensor) -> Tensor:
        """(B, N) bool: the patches of each image to mask."""
        patches = (pixel_values.shape[-2] // self.patch_size) * (pixel_values.shape[-1] // self.patch_size)
        return random_patch_mask(len(pixel_values), patches, self.mask_ratio, pixel_values.device)

    def mask_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """BERT-masked ids and their MLM labels (see `mask_tokens`)."""
        return mask_tokens(input_ids, attention_mask, self.special_ids, self.mask_token_id, self.vocab_size,
                           self.text_mask_probability)

    def reconstruction(self, pixel_values: Tensor, predicted: Tensor, patch_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The masked images and the reconstruction from predicted normalised patches (`paste_reconstruction`);
        drawn for pixel targets only."""
        if self.image_tokenizer is not None:
            raise ValueError("reconstructions are drawn for pixel targets only, not image-tokenizer codes")
        return paste_reconstruction(pixel_values, predicted, patch_mask, self.patch_size)

    def image_target(self, pixel_values: Tensor) -> Tensor:
        """(B, N) codes or (B, N, p * p * 3) normalised pixels of every patch."""
        if self.image_tokenizer is not None:
            return self.image_tokenizer(pixel_values)
        return pixel_targets(pixel_values, self.patch_size)


def prediction_head(width: int, out_features: int) -> nn.Sequential:
    """BERT's prediction head: dense, GELU, LayerNorm, then the output layer."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, out_features))


def transformer_layer_args(width: int, num_heads: int) -> dict:
    """Pre-norm, GELU, no dropout: the settings of the fusion and cross-modality blocks (torch's own layers)."""
    return {"d_model": width, "nhead": num_heads, "dim_feedforward": 4 * width, "dropout": 0.0,
            "activation": "gelu", "batch_first": True, "norm_first": True}


@torch.no_grad()
def paste_reconstruction(pixel_values: Tensor, predicted: Tensor, patch_mask: Tensor,
                         patch_size: int) -> tuple[Tensor, Tensor]:
    """The masked input (masked patches at the image mean, 0 after normalisation) and the reconstruction: the
    predicted normalised patches mapped back with each true patch's own mean and std (as MAE shows them), pasted
    over the masked patches of the original."""
    height, width = pixel_values.shape[-2:]
    patches = patchify(pixel_values, patch_size)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    keep = ~patch_mask.unsqueeze(-1)
    masked = unpatchify(patches * keep, patch_size, height, width)
    rebuilt = torch.where(keep, patches, predicted.float() * std + mean)
    return masked, unpatchify(rebuilt, patch_size, height, width)
