"""BLIP-2 stage-1 losses (Li et al., 2023): image-text contrastive with the max over queries, image-text
matching on hard negatives mined from those similarities, and image-grounded text generation.

As in losses/contrastive.py, ITC scores this rank's rows against columns gathered from all ranks with
gradients. ITM mines its negatives inside the local batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vlm.losses.contrastive import scale_logits
from lightning_vlm.distributed import gather_with_grad, rank_offset


def query_text_similarity(query_emb: Tensor, text_emb: Tensor) -> Tensor:
    """(I, Q, E) query embeddings and (T, E) text embeddings -> (I, T) cosine of each text with its best query."""
    return torch.einsum("iqe,te->itq", query_emb, text_emb).amax(dim=-1)


def itc_loss(query_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE on the max-over-queries similarity; also returns the local (B, B_global) image->text
    similarities (detached) from which ITM mines its negatives."""
    n = query_emb.shape[0]
    labels = torch.arange(n, device=query_emb.device) + rank_offset(n)
    sim_i2t = query_text_similarity(query_emb, gather_with_grad(text_emb))
    sim_t2i = query_text_similarity(gather_with_grad(query_emb), text_emb).T
    loss = (F.cross_entropy(scale_logits(sim_i2t, logit_scale), labels)
            + F.cross_entropy(scale_logits(sim_t2i, logit_scale), labels)) / 2
    return loss, sim_i2t.detach()


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


def itm_loss(logits: Tensor, num_positives: int) -> Tensor:
    """Binary cross-entropy (2-way softmax) over (positives then negatives) pair logits (N, 2)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positives] = 1
    return F.cross_entropy(logits, labels)


def itg_loss(logits: Tensor, input_ids: Tensor, text_mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Next-token cross-entropy of the text (B, T, V) logits: position t predicts token t + 1, padding ignored."""
    targets = input_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
