"""MaskVLM (Kwon et al., 2023): joint masked vision and language modelling. Each modality's masked signal is
recovered with the help of the other, unmasked one, through cross-modality encoders: the image cross encoder
(masked image tokens attend to the text) feeds the pixel reconstruction, the text cross encoder (masked text
attends to the image) feeds masked token prediction. ITC aligns the unimodal encoders; ITM, on hard negatives
mined from the ITC similarities, reads the text cross encoder's [CLS] (as ALBEF does; running the image cross
encoder on all 3B pairs as well tripled the step time here).
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
from lightning_vlm.models.similarity import caption_keys, mine_pair_negatives


class CrossModalityEncoder(nn.Module):
    """Blocks of self-attention over one modality's tokens, cross-attention to the other modality (projected to
    this width), and an MLP: torch's decoder layer without a causal mask."""

    def __init__(self, width: int, other_width: int, depth: int = 3, num_heads: int = 4) -> None:
        super().__init__()
        self.other_proj = nn.Linear(other_width, width)
        layer = nn.TransformerDecoderLayer(**transformer_layer_args(width, num_heads))
        self.blocks = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(width))

    def forward(self, tokens: Tensor, other: Tensor, padding: Tensor | None = None,
                other_padding: Tensor | None = None) -> Tensor:
        """tokens (B, N, width) attend to other (B, M, other_width); paddings (True = ignore) per sequence."""
        return self.blocks(tokens, self.other_proj(other), tgt_key_padding_mask=padding,
                           memory_key_padding_mask=other_padding)


class MaskVLM(DualEncoder):
    """MaskVLM: `encode_images`, `encode_texts` and `similarity` are the dual encoder's (ITC); `forward` gives the
    conditional reconstructions, the ITM logits and the contrastive embeddings."""

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        embed_dim: int = 128,
        cross_depth: int = 3,
        num_heads: int = 4,
        masking: MaskingConfig | None = None,
        logit_scale_init: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__(vision, text, embed_dim, logit_scale_init)
        self.masking = Masking(vision, text, masking)
        self.image_cross = CrossModalityEncoder(vision.width, text.width, cross_depth, num_heads)
        self.text_cross = CrossModalityEncoder(text.width, vision.width, cross_depth, num_heads)
        self.mim_head = prediction_head(vision.width, self.masking.target_dim)
        self.mlm_head = prediction_head(text.width, self.masking.vocab_size)
        self.itm_head = nn.Linear(text.width, 2)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                negatives: HardNegatives | None = None, modality: str = "pair") -> MaskedModelingOutput:
        if modality != "pair":
            raise ValueError(f"MaskVLM recovers each modality from the other: it trains on pairs, not {modality}-only "
                             "batches (FLAVA takes those)")
        image, text = self.vision(pixel_values), self.text(input_ids, attention_mask)
        contrastive = self.embed(image, text, negatives, caption_keys(input_ids, attention_mask))
        masked = self.masking(self.vision, self.text, pixel_values, input_ids, attention_mask)
        padding = attention_mask == 0
        image_given_text = self.image_cross(masked.image.tokens, text.tokens, other_padding=padding)
        text_given_image = self.text_cross(masked.text.tokens, image.tokens, padding=padding)
        prefix, labels = self.vision.num_prefix_tokens, masked.mlm_labels
        predictions = {
            "mim": MaskedPrediction(self.mim_head(image_given_text[:, prefix:]),
                                    self.masking.image_target(pixel_values), masked.image.patch_mask),
            "mlm": MaskedPrediction(self.mlm_head(text_given_image), labels, labels >= 0),
        }
        logits, itm_labels = self.matching(image.tokens, text.tokens, attention_mask, input_ids,
                                           (contrastive.image_emb @ contrastive.text_emb.T).detach())
        return MaskedModelingOutput(predictions, contrastive, logits, itm_labels)

    def matching(self, image: Tensor, text: Tensor, attention_mask: Tensor, input_ids: Tensor,
                 similarity: Tensor) -> tuple[Tensor, Tensor]:
        """ITM logits and labels over B positives, B images each with a mined hard-negative caption and B captions
        each with a mined image (ALBEF's mining; a caption identical to the positive is never its negative)."""
        n = image.shape[0]
        negative_text, negative_image = mine_pair_negatives(similarity, input_ids)
        images = torch.cat([image, image, image[negative_image]])
        texts = torch.cat([text, text[negative_text], text])
        padding = torch.cat([attention_mask, attention_mask[negative_text], attention_mask]) == 0
        logits = self.match_logits(images, texts, padding)
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(image.device)
        return logits, labels

    def match_logits(self, image: Tensor, text: Tensor, padding: Tensor) -> Tensor:
        """(N, 2) not-match / match logits from the text cross encoder's [CLS], which has attended to the image."""
        return self.itm_head(self.text_cross(text, image, padding=padding)[:, 0])

    def reconstruct(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The masked images and their reconstruction conditioned on the unmasked captions; pixel targets only."""
        patch_mask = self.masking.patch_mask(pixel_values)
        text = self.text(input_ids, attention_mask)
        tokens = self.image_cross(self.vision(pixel_values, patch_mask).tokens, text.tokens,
                                  other_padding=attention_mask == 0)
        predicted = self.mim_head(tokens[:, self.vision.num_prefix_tokens:])
        return self.masking.reconstruction(pixel_values, predicted, patch_mask)
