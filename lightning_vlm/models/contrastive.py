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
    """Linear maps of both towers into the shared space, plus the learnable log-scale (and SigLIP's bias).

    `image_width` None: no image map (the identity), for a model that projects its image tokens itself (the authors'
    Llip maps each mixture token with its own key and value projections)."""

    def __init__(
        self,
        image_width: int | None,
        text_width: int,
        embed_dim: int,
        logit_scale_init: float,
        logit_bias_init: float | None = None,
    ) -> None:
        super().__init__()
        self.image_proj = nn.Identity() if image_width is None else nn.Linear(image_width, embed_dim, bias=False)
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



class PerTokenLinear(nn.Module):
    """K bias-free linear maps, one per token position: (..., K, D_in) -> (..., K, D_out). The authors' Llip keys and
    values each mixture token with its own map; initialised as theirs, normal with std D_in^-1/2."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_tokens, in_dim, out_dim) * in_dim**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.einsum("...ki,kio->...ko", tokens, self.weight)


class MixtureCrossAttention(nn.Module):
    """Llip's cross-attention: each caption's query weights the K mixture tokens (keys/values) of an image, per head.

    Built `shared` (one key and one value map for every token, on tokens and queries already in the embedding space)
    or `per_token` (the authors' code: each mixture token its own key and value map from the image encoder's width,
    the query its own map from the text's width, no biases). `temperature` divides the scaled logits q.k / sqrt(d):
    above 1 the weights are closer to uniform, so a caption bends the image's embedding towards itself less. The
    paper's tau divides q.k itself (ours = tau / sqrt(d)).
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, out: nn.Linear, num_heads: int,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if out.in_features % num_heads:
            raise ValueError(f"embed_dim {out.in_features} is not divisible by num_heads {num_heads}")
        if temperature <= 0:
            raise ValueError(f"the mixture attention's temperature must be positive, got {temperature}")
        self.num_heads = num_heads
        self.temperature = temperature
        self.q, self.k, self.v, self.out = q, k, v, out

    @classmethod
    def shared(cls, dim: int, num_heads: int, temperature: float = 1.0) -> MixtureCrossAttention:
        """Maps with biases shared by all K tokens, in the embedding space of width `dim`."""
        return cls(nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim), num_heads,
                   temperature)

    @classmethod
    def per_token(cls, num_tokens: int, token_width: int, query_width: int, dim: int, num_heads: int,
                  temperature: float = 1.0) -> MixtureCrossAttention:
        """The authors' maps into width `dim`: a key and a value map per mixture token, a query map, an output map;
        bias-free, normal with std (input width)^-1/2."""
        q, out = nn.Linear(query_width, dim, bias=False), nn.Linear(dim, dim, bias=False)
        for layer in (q, out):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        return cls(q, PerTokenLinear(num_tokens, token_width, dim), PerTokenLinear(num_tokens, token_width, dim), out,
                   num_heads, temperature)

    def forward(self, mixture: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """mixture (I, K, D) tokens, queries (T, D_q) -> the attention weights (I, T, h*K) and the value tokens
        (I, h*K, E): image i conditioned on caption t is ``weights[i, t] @ values[i] + out_bias()``.

        The output projection is linear, so it maps each image's K value tokens (per head) once instead of the
        I x T mixed ones: out(concat_h sum_k a_hk v_hk) = sum_hk a_hk (W_out^h v_hk) + b.
        """
        return self.weights(mixture, queries).flatten(2), self.values(mixture).flatten(1, 2)

    def values(self, mixture: Tensor) -> Tensor:
        """mixture (I, K, D) -> (I, h, K, E): each head's value tokens through its slice of the output projection."""
        v = self.v(mixture).unflatten(-1, (self.num_heads, -1))  # (I, K, h, d)
        return torch.einsum("ikhd,ehd->ihke", v, self.out.weight.unflatten(1, (self.num_heads, -1)))

    def uniform(self, mixture: Tensor) -> Tensor:
        """mixture (I, K, D) -> (I, E): the output under uniform weights, which no caption conditions."""
        return self.values(mixture).mean(dim=2).sum(dim=1) + self.out_bias()

    def out_bias(self) -> Tensor:
        """(E,) the output projection's bias: zeros where it has none (the authors' maps)."""
        return self.out.weight.new_zeros(self.out.out_features) if self.out.bias is None else self.out.bias

    def weights(self, mixture: Tensor, queries: Tensor) -> Tensor:
        """mixture (I, K, D), queries (T, D_q) -> (I, T, h, K): each head's softmax over an image's K tokens."""
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

    Two heads. Ours (the default): the K tokens share one projection into the embedding space and then shared key and
    value maps, and the query maps the caption's unit embedding, the vector the image is then compared with.
    `authors_head`, the paper's as in the authors' code: each mixture token its own key and value projection from
    the image encoder's width, the query its own projection of the text's pooled final hidden state, no biases; their
    zero-shot prompt ensembling conditions each image once per class, on the class's template-averaged query.
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
        authors_head: bool = False,
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
        self.heads = ContrastiveHeads(None if authors_head else vision.width, text.width, embed_dim, logit_scale_init,
                                      logit_bias_init)
        if authors_head:
            num_tokens = num_mixture_tokens or vision.extra_tokens.shape[1]
            self.mixture_attn = MixtureCrossAttention.per_token(num_tokens, vision.width, text.width, embed_dim,
                                                                num_heads, attention_temperature)
        else:
            self.mixture_attn = MixtureCrossAttention.shared(embed_dim, num_heads, attention_temperature)
        self.uniform_anchor = uniform_anchor
        self.authors_head = authors_head

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
            anchor = scale_logits(cosine_matrix(uniform, self.queries_and_captions(columns)[1]), self.heads.logit_scale,
                                  self.heads.logit_bias)
        return LlipOutput(logits, self.heads.logit_scale, self.heads.logit_bias, valid,
                          self.mixture_entropy(mixture, captions), anchor)

    @torch.no_grad()
    def mixture_entropy(self, mixture: Tensor, texts: Tensor) -> Tensor | None:
        """Mean entropy of each image's mixing weights under its own caption, over ln K: 1 when the weights are
        uniform (the caption no longer conditions the image: SigLIP on the tokens' mean), 0 when each head reads
        one token. Query and key maps that never learned (docs/results/contrastive.md)
        show here as 1.0."""
        num_tokens = mixture.shape[1]
        if num_tokens == 1:
            return None
        # detached: a view taken under no_grad keeps requires_grad without a grad_fn, which module hooks (FLOPs) reject
        weights = self.mixture_attn.weights(mixture, self.queries_and_captions(texts.detach())[0])  # (I, T = I, h, K)
        own = weights.diagonal(dim1=0, dim2=1).movedim(-1, 0).float()  # (I, h, K): each image under its caption
        return -(own * own.clamp_min(1e-12).log()).sum(-1).mean() / math.log(num_tokens)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, K, E) projected mixture tokens (not yet conditioned on a caption); with `authors_head`
        (N, K, D_vision), each token projected by its own key and value maps when scored."""
        image = self.vision(pixel_values)
        if self.mixture_pool is None:
            mixture = image.extra_tokens
        else:
            mixture = image.pooled.unsqueeze(1) + self.mixture_pool(image.tokens)
        return self.heads.image_proj(mixture)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(N, L) -> (N, E) normalised caption embeddings; with `authors_head` (N, D_text + E): the pooled hidden
        state, which the query projection reads, beside the normalised caption embedding."""
        pooled = self.text(input_ids, attention_mask).pooled
        captions = self.heads.embed_text(pooled)
        return torch.cat([pooled, captions.to(pooled.dtype)], dim=-1) if self.authors_head else captions

    def queries_and_captions(self, text_repr: Tensor) -> tuple[Tensor, Tensor]:
        """What `encode_texts` gives the query projection, and the unit caption embedding the conditioned image is
        compared with: the same vector in our head; in the authors' the two halves, the embedding renormalised (a
        template average of unit vectors is shorter)."""
        if not self.authors_head:
            return text_repr, text_repr
        hidden, captions = text_repr.split([self.text.width, text_repr.shape[-1] - self.text.width], dim=-1)
        return hidden, F.normalize(captions, dim=-1)

    @property
    def averages_templates(self) -> bool:
        """Whether zero-shot prompt ensembling averages a class's text representations over its templates before
        scoring (the authors' evaluation: one query per class), rather than averaging the scores."""
        return self.authors_head

    def similarity(self, image_repr: Tensor, text_repr: Tensor, max_pairs: int = 2**20) -> Tensor:
        """(N_img, N_txt) logits, conditioning every image on every caption; images in chunks of <= max_pairs pairs."""
        chunk = max(1, max_pairs // max(1, text_repr.shape[0]))
        cosine = torch.cat([self._cosine(part, text_repr) for part in image_repr.split(chunk)])
        return scale_logits(cosine, self.heads.logit_scale, self.heads.logit_bias)

    def _cosine(self, mixture: Tensor, texts: Tensor) -> Tensor:
        """Cosine between each caption and the image embedding conditioned on that caption: (I, T).

        The (I, T, E) conditioned embeddings are never formed (written by hand: no library scores a mixture this
        way). With x_it = a_it V_i + b for weights a_it over the value tokens V_i, both parts of the cosine come
        from small per-image products: x_it . c_t = a_it (V_i c_t) + b . c_t and
        |x_it|^2 = a_it G_i a_it + 2 a_it (V_i b) + |b|^2 with the Gram matrix G_i = V_i V_i^T (h*K x h*K).
        """
        queries, captions = self.queries_and_captions(texts)
        weights, values = self.mixture_attn(mixture, queries)
        bias = self.mixture_attn.out_bias()
        with torch.autocast(values.device.type, enabled=False):  # float32 logits, as in `cosine_matrix`
            weights, values, captions, bias = weights.float(), values.float(), captions.float(), bias.float()
            dot = torch.einsum("itj,ijt->it", weights, values @ captions.T) + captions @ bias
            quadratic = ((weights @ (values @ values.transpose(1, 2))) * weights).sum(-1)
            linear = (weights @ (values @ bias).unsqueeze(-1)).squeeze(-1)
            return dot / (quadratic + 2 * linear + bias @ bias).clamp_min(0).sqrt().clamp_min(1e-12)
