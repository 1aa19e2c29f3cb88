"""FLAVA (Singh et al., 2022): an image encoder, a text encoder, and a multimodal encoder over both hidden-state
sequences with its own [CLS] token.

Objectives, each a named term of `MaskedModelingLoss`: unimodal MLM on the text encoder and MIM on the image
encoder; a global contrastive loss between the unmasked encoders' pooled outputs; masked multimodal modelling
(MMM: image and text masked together, both recovered from the multimodal encoder) on matched pairs; and
image-text matching (ITM) on the multimodal [CLS], where a share of the images is swapped with another image of
the batch. As in FLAVA, MMM and ITM read one multimodal pass over the masked inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_vlm.encoders import TextEncoder, VisionEncoder
from lightning_vlm.models.contrastive import DualEncoder, HardNegatives
from lightning_vlm.models.masked import (
    MaskedModelingOutput,
    MaskedPrediction,
    Masking,
    MaskingConfig,
    prediction_head,
    transformer_layer_args,
)
from lightning_vlm.models.similarity import caption_keys


class MultimodalEncoder(nn.Module):
    """A transformer over [CLS_mm; image states; text states], each modality projected to `width` and tagged with
    a learned modality embedding (the unimodal encoders already gave positions)."""

    def __init__(self, image_width: int, text_width: int, width: int, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        self.image_proj, self.text_proj = nn.Linear(image_width, width), nn.Linear(text_width, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.modality = nn.Parameter(torch.randn(2, width) * 0.02)
        layer = nn.TransformerEncoderLayer(**transformer_layer_args(width, num_heads))
        self.blocks = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)

    def forward(self, image: Tensor, text: Tensor, attention_mask: Tensor) -> Tensor:
        """image (B, N_i, D_i), text (B, L, D_t), attention_mask (B, L) -> (B, 1 + N_i + L, width); text padding
        is hidden from attention."""
        b = image.shape[0]
        sequence = torch.cat([self.cls_token.expand(b, -1, -1), self.image_proj(image) + self.modality[0],
                              self.text_proj(text) + self.modality[1]], dim=1)
        keep = torch.cat([attention_mask.new_ones(b, 1 + image.shape[1]), attention_mask], dim=1)
        return self.blocks(sequence, src_key_padding_mask=keep == 0)


class FLAVA(DualEncoder):
    """FLAVA: `encode_images`, `encode_texts` and `similarity` are the dual encoder's (the shared evaluation
    retrieves with them); `forward` gives every pretraining objective's predictions and targets.

    Widths are derived from the encoders; ``multimodal_width`` defaults to the text encoder's.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        embed_dim: int = 128,
        multimodal_width: int | None = None,
        multimodal_depth: int = 2,
        num_heads: int = 4,
        masking: MaskingConfig | None = None,
        itm_negative_fraction: float = 0.5,
        logit_scale_init: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__(vision, text, embed_dim, logit_scale_init)
        self.masking = Masking(vision, text, masking)
        width = multimodal_width or text.width
        self.multimodal = MultimodalEncoder(vision.width, text.width, width, multimodal_depth, num_heads)
        vocab, target = self.masking.vocab_size, self.masking.target_dim
        self.mlm_head, self.mim_head = prediction_head(text.width, vocab), prediction_head(vision.width, target)
        self.mmm_text_head, self.mmm_image_head = prediction_head(width, vocab), prediction_head(width, target)
        self.itm_head = nn.Linear(width, 2)
        self.itm_negative_fraction = itm_negative_fraction

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                negatives: HardNegatives | None = None, modality: str = "pair") -> MaskedModelingOutput:
        if modality == "image":
            return self.image_only(pixel_values)
        if modality == "text":
            return self.text_only(input_ids, attention_mask)
        image, text = self.vision(pixel_values), self.text(input_ids, attention_mask)
        contrastive = self.embed(image, text, negatives, caption_keys(input_ids, attention_mask))
        masked = self.masking(self.vision, self.text, pixel_values, input_ids, attention_mask)
        target, patch_mask = self.masking.image_target(pixel_values), masked.image.patch_mask
        mlm_labels = masked.mlm_labels
        partner, matched = self.matching_partners(input_ids)
        fused = self.multimodal(masked.image.tokens[partner], masked.text.tokens, attention_mask)
        prefix, num_image = self.vision.num_prefix_tokens, masked.image.tokens.shape[1]
        fused_patches, fused_text = fused[:, 1 + prefix : 1 + num_image], fused[:, 1 + num_image :]
        pairs = matched.unsqueeze(1)
        predictions = {
            "mlm": MaskedPrediction(self.mlm_head(masked.text.tokens), mlm_labels, mlm_labels >= 0),
            "mim": MaskedPrediction(self.mim_head(masked.image.patch_tokens), target, patch_mask),
            "mmm_text": MaskedPrediction(self.mmm_text_head(fused_text), mlm_labels, (mlm_labels >= 0) & pairs),
            # the fused image is the partner's: so are its targets (a swapped image with an equal caption matches)
            "mmm_image": MaskedPrediction(self.mmm_image_head(fused_patches), target[partner],
                                          patch_mask[partner] & pairs),
        }
        return MaskedModelingOutput(predictions, contrastive, self.itm_head(fused[:, 0]), matched.long())

    def image_only(self, pixel_values: Tensor) -> MaskedModelingOutput:
        """An image-only batch trains the image encoder alone, by MIM (FLAVA's unimodal pretraining)."""
        patch_mask = self.masking.patch_mask(pixel_values)
        predicted = self.mim_head(self.vision(pixel_values, patch_mask).patch_tokens)
        return MaskedModelingOutput(
            {"mim": MaskedPrediction(predicted, self.masking.image_target(pixel_values), patch_mask)})

    def text_only(self, input_ids: Tensor, attention_mask: Tensor) -> MaskedModelingOutput:
        """A text-only batch trains the text encoder alone, by MLM."""
        masked_ids, labels = self.masking.mask_text(input_ids, attention_mask)
        predicted = self.mlm_head(self.text(masked_ids, attention_mask).tokens)
        return MaskedModelingOutput({"mlm": MaskedPrediction(predicted, labels, labels >= 0)})

    def matching_partners(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Which image each caption is fused with, and whether the pair matches: a drawn share of the rows takes
        another row's image; a swapped image whose caption equals this row's still counts as a match."""
        n = input_ids.shape[0]
        rows = torch.arange(n, device=input_ids.device)
        swap = torch.rand(n, device=input_ids.device) < self.itm_negative_fraction
        shift = torch.randint(1, max(n, 2), (n,), device=input_ids.device)
        partner = torch.where(swap & (n > 1), (rows + shift) % n, rows)
        matched = (input_ids[partner] == input_ids).all(dim=1)
        return partner, matched

    def reconstruct(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The masked images and the image encoder's (unimodal MIM) reconstruction of them; pixel targets only."""
        patch_mask = self.masking.patch_mask(pixel_values)
        predicted = self.mim_head(self.vision(pixel_values, patch_mask).patch_tokens)
        return self.masking.reconstruction(pixel_values, predicted, patch_mask)
