"""How image and text representations are scored against each other: the scaled cosine logits, caption keys that
find copies of a caption, the columns (captions and hard negatives) of every rank, the best-query similarity of a
Q-Former, and hard negatives mined from those scores. Models score with these; losses (losses/) contrast the scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_vlm.distributed import gather_with_grad, rank_offset

LOGIT_SCALE_MAX = math.log(100.0)


def scale_logits(cosine: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None) -> Tensor:
    """t * cosine + b with t = exp(logit_scale clamped to [0, ln 100]).

    The clamp happens here, in the forward pass (the parameter itself is never modified); at the bound the
    scale gets no gradient, which caps the temperature as CLIP does.
    """
    logits = temperature(logit_scale) * cosine
    return logits if logit_bias is None else logits + logit_bias


def temperature(logit_scale: Tensor) -> Tensor:
    """The multiplier t = exp(logit_scale), the log-scale clamped to [0, ln 100]."""
    return logit_scale.clamp(0.0, LOGIT_SCALE_MAX).exp()


def cosine_matrix(rows: Tensor, columns: Tensor) -> Tensor:
    """(n, m) dot products of normalised embeddings, in float32 even under autocast: scaled by up to 100, bf16's
    8-bit mantissa would move a logit by up to ~0.4, more than the margins that tell a caption from its hard
    negative."""
    with torch.autocast(rows.device.type, enabled=False):
        return rows.float() @ columns.float().T


def caption_keys(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(N,) int64 keys equal for captions with the same real tokens at the same positions.

    Two polynomial hashes modulo 31-bit primes, packed into one int64 (no overflow on the way). Written here
    because the keys must match across ranks: ``torch.unique(dim=0)`` groups rows within one process only.
    """
    tokens = (input_ids.long() + 1) * attention_mask.long()  # padding 0, every real token >= 1
    key = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    for base, prime in _CAPTION_HASHES:
        powers = torch.tensor([pow(base, t, prime) for t in range(tokens.shape[1])], device=tokens.device)
        key = key * 2**31 + ((tokens % prime) * powers % prime).sum(dim=1) % prime
    return key


_CAPTION_HASHES = ((1_000_003, 2_147_483_647), (911_382_323, 2_147_483_629))


def text_columns(
    text_emb: Tensor,
    negative_emb: Tensor | None = None,
    negative_valid: Tensor | None = None,
    text_keys: Tensor | None = None,
    negative_keys: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Every rank's captions, then every rank's real hard negatives (gathered with gradients; padded slots,
    ``negative_valid`` False, are left out), and which columns count for which local row: None when all do, else
    a (n_local, n_columns) bool mask that, given `text_keys`, hides the copies of a row's own caption (its own
    positive always counts)."""
    columns = gather_with_grad(text_emb)
    keys = None if text_keys is None else gather_with_grad(text_keys)
    if negative_emb is not None:
        if negative_valid is None:
            negative_valid = torch.ones(negative_emb.shape[0], dtype=torch.bool, device=negative_emb.device)
        real = gather_with_grad(negative_valid.to(negative_emb.dtype)) > 0.5  # float: gloo gathers no bools
        columns = torch.cat([columns, gather_with_grad(negative_emb)[real]])
        if keys is not None:
            unknown = torch.full((negative_emb.shape[0],), -1, dtype=keys.dtype, device=keys.device)
            keys = torch.cat([keys, gather_with_grad(unknown if negative_keys is None else negative_keys)[real]])
    if keys is None:
        return columns, None
    rows = torch.arange(text_keys.shape[0], device=keys.device)
    distinct = text_keys[:, None] != keys[None, :]
    distinct[rows, rows + rank_offset(len(rows))] = True
    return columns, distinct


def query_text_similarity(query_emb: Tensor, text_emb: Tensor) -> Tensor:
    """(I, Q, E) query embeddings and (T, E) text embeddings -> (I, T) cosine of each text with its best query."""
    return torch.einsum("iqe,te->itq", query_emb, text_emb).amax(dim=-1)


def mine_hard_negatives(similarity: Tensor, same: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each row, one column sampled with probability softmax(similarity) among the columns that are not
    the row's match (``same`` True: the pair itself and any duplicate of it, which would be a false negative).
    A row without any other column falls back to a uniform draw among all of them."""
    weights = similarity.float().softmax(dim=1).masked_fill(same, 0.0)
    empty = weights.sum(dim=1) <= 0
    weights[empty] = 1.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mine_pair_negatives(similarity: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For (B, B) local image->text similarities: a mined negative caption for each image and a mined negative
    image for each caption, never one whose caption equals the positive (equal padded ids)."""
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)
    return mine_hard_negatives(similarity, same_text), mine_hard_negatives(similarity.T, same_text)
