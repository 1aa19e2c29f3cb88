"""Contrastive image-text models: a dual encoder (CLIP, SigLIP) and Llip's caption-conditioned image embedding.

Both are `Retriever`s (eval/suite.py): encode_images, encode_texts, similarity (the training logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vlm.adapters import AttentionPooler
from lightning_vlm.encoders import TextEncoder, TextOutput, VisionEncoder, VisionOutput
from lightning_vlm.models.similarity import caption_keys, cosine_matrix, scale_logits, text_columns


@dataclass
class HardNegatives:
    """Hard-negative captions of a batch (see `Collator`): (M, L) ids and mask, and (M,) which are real."""

    input_ids: Tensor
    attention_mask: Tensor
    valid: Tensor

    @classmethod
    def from_batch(cls, batch: dict) -> HardNegatives | None:
        """The batch's hard negatives, or None when it has none."""
        if "negative_input_ids" not in batch:
            return None
        return cls(batch["negative_input_ids"], batch["negative_attention_mask"], batch["negative_valid"])

    def encode(self, encode_texts: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(M, E) embeddings of the real negatives, trimmed to their longest; padded slots (which the losses mask
        out) stay zero and cost no text-encoder time (a quarter to half of the slots on the synthetic benchmark)."""
        rows = self.valid.nonzero().flatten()
        encoded = rows if len(rows) else rows.new_zeros(1)  # with none real, one padded slot gives the width E
        ids, mask = self.input_ids[encoded], self.attention_mask[encoded]
        length = max(1, int(mask.sum(dim=1).max()))
        real = encode_texts(ids[:, :length], mask[:, :length])[: len(rows)]
        return real.new_zeros(len(self.valid), real.shape[-1]).index_copy(0, rows, real)

    def keys(self) -> Tensor:
        """(M,) caption keys (`caption_keys`): a negative that spells another pair's caption is not its negative."""
        return caption_keys(self.input_ids, self.attention_mask)


@dataclass
class ContrastiveOutput:
    """image_emb, text_emb: (B, E) L2-normalised; logit_scale: log of the temperature t; logit_bias: b or None;
    negative_emb (M, E) hard-negative captions and negative_valid (M,) their mask, when the batch has them;
    text_keys (B,) and negative_keys (M,) caption keys, so that copies of a caption are not its negatives."""

    image_emb: Tensor
    text_emb: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None
    negative_emb: Tensor | None = None
    negative_valid: Tensor | None = None
    text_keys: Tensor | None = None
    negative_keys: Tensor | None = None


@dataclass
class LlipOutput:
    """logits: (B_local, B_global [+ M_global]) scaled and biased, local images against the captions of every
    rank in rank order, then every rank's real hard negatives; column_valid (B_local, n_columns) masks the copies
    of a row's caption (None when every pair counts); mixture_entropy: `Llip.mixture_entropy` of the batch (a
    detached scalar, logged), None where it is undefined (one mixture token); anchor_logits: the same columns scored
    against each image's caption-independent embedding (`Llip(uniform_anchor=True)`), else None."""

    logits: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None
    column_valid: Tensor | None = None
    mixture_entropy: Tensor | None = None
    anchor_logits: Tensor | None = None


class ContrastiveHeads(nn.Module):
    """Linear maps of both towers into the shared space, plus the learnable log-scale (and SigLIP's bias)."""

    def __init__(
        self,
        image_width: int,
        text_width: int,
        embed_dim: int,
        logit_scale_init: float,
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor(float(logit_bias_init)))

    def embed_text(self, pooled: Tensor) -> Tensor:
        """(N, D_text) pooled caption features -> (N, E) normalised caption embeddings."""
        return F.normalize(self.text_proj(pooled), dim=-1)


class DualEncoder(nn.Module):
    """CLIP / SigLIP: pooled image and text features, projected and L2-normalised, scored by scaled dot product.

    SigLIP: logit_scale_init=ln 10, logit_bias_init=-10. The scale is clamped to [0, ln 100] in `scale_logits`.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        embed_dim: int = 64,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.heads = ContrastiveHeads(vision.width, text.width, embed_dim, logit_scale_init, logit_bias_init)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                negatives: HardNegatives | None = None) -> ContrastiveOutput:
        """Embed both modalities of a batch of pairs (and its hard-negative captions); the loss gathers across ranks."""
        return self.embed(self.vision(pixel_values), self.text(input_ids, attention_mask), negatives,
                          caption_keys(input_ids, attention_mask))

    def embed(self, image: VisionOutput, text: TextOutput, negatives: HardNegatives | None = None,
              text_keys: Tensor | None = None) -> ContrastiveOutput:
        """The contrastive output of encoded images and captions (and the batch's hard negatives, encoded here);
        `text_keys` (`caption_keys` of the captions) keep copies of a caption from being its negatives."""
        return ContrastiveOutput(
            F.normalize(self.heads.image_proj(image.pooled), dim=-1),
            self.heads.embed_text(text.pooled),
            self.heads.logit_scale,
            self.heads.logit_bias,
            None if negatives is None else negatives.encode(self.encode_texts),
            None if negatives is None else negatives.valid,
            text_keys,
            None if negatives is None or text_keys is None else negatives.keys(),
        )

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, E) normalised."""
        return F.normalize(self.heads.image_proj(self.vision(pixel_values).pooled), dim=-1)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) -> (N, E) normalised."""
        return self.heads.embed_text(self.text(input_ids, attention_mask).pooled)

    def similarity(self, image_repr: Tensor, text_repr: Tensor) -> Tensor:
        """(N_img, N_txt) logits exactly as the losses see them (sigmoid of them is SigLIP's match probability)."""
        return scale_logits(cosine_matrix(image_repr, text_repr), self.heads.logit_scale, self.heads.logit_bias)



class MixtureCrossAttention(nn.Module):
    """Llip's cross-attention: each caption embedding (query) weights the K mixture tokens (keys/values) of an image.

    `temperature` divides the scaled logits q.k / sqrt(d): above 1 the weights are closer to uniform, so a caption
    bends the image's embedding towards itself less. The paper's tau divides q.k itself (ours = tau / sqrt(d)).
    """

    def __init__(self, dim: int, num_heads: int, temperature: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if temperature <= 0:
            raise ValueError(f"the mixture attention's temperature must be positive, got {temperature}")
        self.num_heads = num_heads
        self.temperature = temperature
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, mixture: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """mixture (I, K, E), queries (T, E) -> the attention weights (I, T, h*K) and the value tokens (I, h*K, E):
        image i conditioned on caption t is ``weights[i, t] @ values[i] + out.bias``.

        The output projection is linear, so it maps each image's K value tokens (per head) once instead of the
        I x T mixed ones: out(concat_h sum_k a_hk v_hk) = sum_hk a_hk (W_out^h v_hk) + b.
        """
        return self.weights(mixture, queries).flatten(2), self.values(mixture).flatten(1, 2)

    def values(self, mixture: Tensor) -> Tensor:
        """mixture (I, K, E) -> (I, h, K, E): each head's value tokens through its slice of the output projection."""
        v = self.v(mixture).unflatten(-1, (self.num_heads, -1))  # (I, K, h, d)
        return torch.einsum("ikhd,ehd->ihke", v, self.out.weight.unflatten(1, (self.num_heads, -1)))

    def uniform(self, mixture: Tensor) -> Tensor:
        """mixture (I, K, E) -> (I, E): the output under uniform weights, which no caption conditions."""
        return self.values(mixture).mean(dim=2).sum(dim=1) + self.out.bias

    def weights(self, mixture: Tensor, queries: Tensor) -> Tensor:
        """mixture (I, K, E), queries (T, E) -> (I, T, h, K): each head's softmax over an image's K tokens."""
        q = self.q(queries).unflatten(-1, (self.num_heads, -1))  # (T, h, d)
        k = self.k(mixture).unflatten(-1, (self.num_heads, -1))  # (I, K, h, d)
        scale = q.shape[-1] ** -0.5 / self.temperature
        return (torch.einsum("thd,ikhd->ithk", q, k) * scale).softmax(dim=-1)


class Llip(nn.Module):
    """Llip (Lavoie et al., 2024): K mixture tokens from the image encoder, mixed per caption by cross-attention.

    The caption-conditioned image embedding is contrasted with the caption by the sigmoid loss (LlipLoss). The
    mixture tokens are the outputs of K learnable tokens appended to a ViT (`VisionEncoder(num_extra_tokens=K)`,
    the paper's design) or, for an encoder that takes no extra tokens (a CNN), the encoder's pooled vector plus what
    each of K learned queries reads from its output tokens (`num_mixture_tokens=K`, an attentional pooler as in
    CoCa, its output scale starting at zero): training starts from SigLIP on the pooled vector, and the tokens
    part from it only as far as the captions reward. `attention_temperature` is the mixing softmax's temperature.
    `mixture_query_std` is the scale of the pooler's queries at initialisation: at 0.02 its K reads start alike, so
    the mixing attention has nothing to tell apart and (docs/results/contrastive.md) it
    mostly stays uniform; at 1 the reads start distinct and the attention learns to condition within a few hundred
    steps. `uniform_anchor` also contrasts each image's uniform mix, which no caption conditions, with the same
    columns (LlipLoss's "anchor" term; not in the paper: a regulariser that keeps the tokens' mean a whole SigLIP
    embedding while the captions condition around it).
    """

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        embed_dim: int = 64,
        num_heads: int = 2,
        logit_scale_init: float = math.log(10.0),
        logit_bias_init: float = -10.0,
        num_mixture_tokens: int | None = None,
        attention_temperature: float = 1.0,
        mixture_query_std: float = 0.02,
        uniform_anchor: bool = False,
    ) -> None:
        super().__init__()
        if (vision.extra_tokens is None) == (num_mixture_tokens is None):
            raise ValueError("Llip takes its mixture tokens from VisionEncoder(num_extra_tokens=K) on a ViT or from "
                             "num_mixture_tokens=K learned queries over the encoder's tokens: give exactly one")
        self.vision = vision
        self.text = text
        self.mixture_pool = None
        if num_mixture_tokens is not None:
            self.mixture_pool = AttentionPooler(num_mixture_tokens, num_heads, mixture_query_std).build(
                vision.width, vision.width)
            nn.init.zeros_(self.mixture_pool.norm.weight)  # ReZero-style: each token starts as the pooled vector
        self.heads = ContrastiveHeads(vision.width, text.width, embed_dim, logit_scale_init, logit_bias_init)
        self.mixture_attn = MixtureCrossAttention(embed_dim, num_heads, attention_temperature)
        self.uniform_anchor = uniform_anchor

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                negatives: HardNegatives | None = None) -> LlipOutput:
        """Local images against the captions (then hard negatives) of all ranks, gathered with gradients."""
        negative_emb = None if negatives is None else negatives.encode(self.encode_texts)
        captions = self.encode_texts(input_ids, attention_mask)
        columns, valid = text_columns(captions, negative_emb, None if negatives is None else negatives.valid,
                                      caption_keys(input_ids, attention_mask),
                                      None if negatives is None else negatives.keys())
        mixture = self.encode_images(pixel_values)
        logits = self.similarity(mixture, columns)
        anchor = None
        if self.uniform_anchor:
            uniform = F.normalize(self.mixture_attn.uniform(mixture), dim=-1)
            anchor = scale_logits(cosine_matrix(uniform, columns), self.heads.logit_scale, self.heads.logit_bias)
        return LlipOutput(logits, self.heads.logit_scale, self.heads.logit_bias, valid,
                          self.mixture_entropy(mixture, captions), anchor)

    @torch.no_grad()
    def mixture_entropy(self, mixture: Tensor, captions: Tensor) -> Tensor | None:
        """Mean entropy of each image's mixing weights under its own caption, over ln K: 1 when the weights are
        uniform (the caption no longer conditions the image: SigLIP on the tokens' mean), 0 when each head reads
        one token. Query and key maps that never learned (docs/results/contrastive.md)
        show here as 1.0."""
        num_tokens = mixture.shape[1]
        if num_tokens == 1:
            return None
        weights = self.mixture_attn.weights(mixture, captions)  # (I, T = I, h, K)
        own = weights.diagonal(dim1=0, dim2=1).movedim(-1, 0).float()  # (I, h, K): each image under its caption
        return -(own * own.clamp_min(1e-12).log()).sum(-1).mean() / math.log(num_tokens)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, E) projected mixture tokens (not yet conditioned on a caption)."""
        image = self.vision(pixel_values)
        if self.mixture_pool is None:
            mixture = image.extra_tokens
        else:
            mixture = image.pooled.unsqueeze(1) + self.mixture_pool(image.tokens)
        return self.heads.image_proj(mixture)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) -> (N, E) normalised caption embeddings."""
        return self.heads.embed_text(self.text(input_ids, attention_mask).pooled)

    def similarity(self, image_repr: Tensor, text_repr: Tensor, max_pairs: int = 2**20) -> Tensor:
        """(N_img, N_txt) logits, conditioning every image on every caption; images in chunks of <= max_pairs pairs."""
        chunk = max(1, max_pairs // max(1, text_repr.shape[0]))
        cosine = torch.cat([self._cosine(part, text_repr) for part in image_repr.split(chunk)])
        return scale_logits(cosine, self.heads.logit_scale, self.heads.logit_bias)

    def _cosine(self, mixture: Tensor, captions: Tensor) -> Tensor:
        """Cosine between each caption and the image embedding conditioned on that caption: (I, T).

        The (I, T, E) conditioned embeddings are never formed (written by hand: no library scores a mixture this
        way). With x_it = a_it V_i + b for weights a_it over the value tokens V_i, both parts of the cosine come
        from small per-image products: x_it . c_t = a_it (V_i c_t) + b . c_t and
        |x_it|^2 = a_it G_i a_it + 2 a_it (V_i b) + |b|^2 with the Gram matrix G_i = V_i V_i^T (h*K x h*K).
        """
        weights, values = self.mixture_attn(mixture, captions)
        bias = self.mixture_attn.out.bias
        with torch.autocast(values.device.type, enabled=False):  # float32 logits, as in `cosine_matrix`
            weights, values, captions, bias = weights.float(), values.float(), captions.float(), bias.float()
            dot = torch.einsum("itj,ijt->it", weights, values @ captions.T) + captions @ bias
            quadratic = ((weights @ (values @ values.transpose(1, 2))) * weights).sum(-1)
            linear = (weights @ (values @ bias).unsqueeze(-1)).squeeze(-1)
            return dot / (quadratic + 2 * linear + bias @ bias).clamp_min(0).sqrt().clamp_min(1e-12)
