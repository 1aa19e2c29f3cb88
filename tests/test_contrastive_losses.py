"""Contrastive losses against plain loop references, open_clip's losses, a hand-computable constant, and the
logit-scale clamp."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_vlm.losses import (
    CLIPLoss,
    LlipLoss,
    LossOutput,
    SigLIPLoss,
    clip_loss,
    siglip_loss,
    sigmoid_pair_loss,
)
from lightning_vlm.models import ContrastiveOutput, LlipOutput
from lightning_vlm.models.similarity import caption_keys, scale_logits


def _embeddings(n: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _reference_clip(img: torch.Tensor, txt: torch.Tensor, t: float) -> float:
    """Symmetric InfoNCE written out with loops: -log softmax of the matching pair, both directions."""
    n, total = img.shape[0], 0.0
    for i in range(n):
        row = [t * float(img[i] @ txt[j]) for j in range(n)]
        col = [t * float(txt[i] @ img[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * n)


def _reference_sigmoid(logits: torch.Tensor, offset: int) -> float:
    """-sum_ij log sigmoid(z_ij * logit_ij) / n_rows, z = +1 at (i, offset + i), else -1."""
    total = 0.0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            z = 1.0 if j == offset + i else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * float(logits[i, j]))))
    return total / logits.shape[0]


def test_clip_loss_matches_loop_reference() -> None:
    img, txt = _embeddings()
    scale = torch.tensor(math.log(1 / 0.07))
    assert clip_loss(img, txt, scale).item() == pytest.approx(_reference_clip(img, txt, 1 / 0.07), rel=1e-5)


def _reference_negclip(img: torch.Tensor, txt: torch.Tensor, neg: torch.Tensor, t: float) -> float:
    """NegCLIP written out: image i's softmax runs over every caption and every negative; caption j's over images."""
    n, total = img.shape[0], 0.0
    for i in range(n):
        row = [t * float(img[i] @ c) for c in torch.cat([txt, neg])]
        col = [t * float(txt[i] @ img[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(r) for r in row)))
        total += -(col[i] - math.log(sum(math.exp(c) for c in col)))
    return total / (2 * n)


def test_clip_loss_with_hard_negatives_matches_loop_reference() -> None:
    img, txt = _embeddings(seed=3)
    neg = _embeddings(n=12, seed=4)[0]
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 7]] = False  # padded slots: as if those two negatives were never there
    expected = _reference_negclip(img, txt, neg[valid], 10.0)
    assert clip_loss(img, txt, torch.tensor(math.log(10.0)), neg, valid).item() == pytest.approx(expected, rel=1e-5)
    assert clip_loss(img, txt, torch.tensor(math.log(10.0)), neg).item() == pytest.approx(
        _reference_negclip(img, txt, neg, 10.0), rel=1e-5)


def test_siglip_loss_with_hard_negatives_counts_them_as_negative_pairs() -> None:
    img, txt = _embeddings(seed=5)
    neg = _embeddings(n=12, seed=6)[0]
    valid = torch.ones(12, dtype=torch.bool)
    valid[0] = False
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    expected = _reference_sigmoid(10.0 * img @ torch.cat([txt, neg[valid]]).T - 10.0, offset=0)
    assert siglip_loss(img, txt, scale, bias, neg, valid).item() == pytest.approx(expected, rel=1e-5)


def test_logits_stay_float32_under_bf16_autocast() -> None:
    """At t = 100 a bf16 matmul would move logits by ~0.2: both losses must match the float32 reference on the
    same (bf16-rounded) embeddings, as the trainer's bf16-mixed precision hands them over."""
    img, txt = (e.bfloat16() for e in _embeddings(n=16, d=64, seed=7))
    scale, bias = torch.tensor(math.log(100.0)), torch.tensor(-10.0)
    expected_clip = _reference_clip(img.float(), txt.float(), 100.0)
    expected_siglip = _reference_sigmoid(100.0 * img.float() @ txt.float().T - 10.0, offset=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert clip_loss(img, txt, scale).item() == pytest.approx(expected_clip, rel=1e-5)
        assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(expected_siglip, rel=1e-5)


def test_caption_keys_match_exactly_the_same_real_tokens() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9], [5, 6, 8, 0, 0], [5, 6, 7, 0, 0], [5, 6, 7, 0, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    keys = caption_keys(ids, mask).tolist()
    assert keys[0] == keys[1] == keys[4]  # padding ids never count
    assert len({keys[0], keys[2], keys[3]}) == 3  # another token; a real token 0 is not padding
    assert caption_keys(ids[:1, :3], mask[:1, :3]).item() == keys[0]  # the padded width does not matter


def _reference_deduplicated(img, txt, neg, keys, neg_keys, t, bias=None) -> float:
    """Per-row losses written out, every column whose caption equals the row's own (bar its positive) skipped:
    CLIP (both directions) when `bias` is None, else SigLIP's sigmoid over the remaining pairs."""
    columns, column_keys = torch.cat([txt, neg]), keys + neg_keys
    n, total = img.shape[0], 0.0
    for i in range(n):
        kept = [j for j, key in enumerate(column_keys) if j == i or key != keys[i]]
        row = {j: t * float(img[i] @ columns[j]) + (bias or 0.0) for j in kept}
        if bias is not None:
            total += sum(-math.log(1 / (1 + math.exp(-(1 if j == i else -1) * z))) for j, z in row.items())
            continue
        col = {j: t * float(txt[i] @ img[j]) for j in range(n) if j == i or keys[j] != keys[i]}
        total += -(row[i] - math.log(sum(math.exp(r) for r in row.values()))) / 2
        total += -(col[i] - math.log(sum(math.exp(c) for c in col.values()))) / 2
    return total / n


def test_copies_of_a_caption_are_not_its_negatives() -> None:
    """Captions 0 and 3 are one text, and negative 1 spells caption 2: those pairs leave the loss, both ways."""
    img, txt = _embeddings(seed=7)
    txt[3] = txt[0]
    neg = _embeddings(n=4, seed=8)[0]
    neg[1] = txt[2]
    keys, neg_keys = [10, 11, 12, 10, 14, 15], [20, 12, 22, 23]
    t, scale, bias = 10.0, torch.tensor(math.log(10.0)), torch.tensor(-2.0)  # a bias at which negatives weigh
    as_tensors = torch.tensor(keys), torch.tensor(neg_keys)
    clip = clip_loss(img, txt, scale, neg, None, *as_tensors).item()
    assert clip == pytest.approx(_reference_deduplicated(img, txt, neg, keys, neg_keys, t), rel=1e-5)
    assert clip != pytest.approx(clip_loss(img, txt, scale, neg).item(), rel=1e-3)
    siglip = siglip_loss(img, txt, scale, bias, neg, None, *as_tensors).item()
    assert siglip == pytest.approx(_reference_deduplicated(img, txt, neg, keys, neg_keys, t, -2.0), rel=1e-5)
    assert siglip != pytest.approx(siglip_loss(img, txt, scale, bias, neg).item(), rel=1e-3)
    without_negatives = clip_loss(img, txt, scale, text_keys=as_tensors[0]).item()
    assert without_negatives == pytest.approx(_reference_deduplicated(img, txt, neg[:0], keys, [], t), rel=1e-5)


@pytest.fixture(scope="module")
def open_clip_loss():
    """open_clip's loss module (installed by the `test` extra)."""
    return pytest.importorskip("open_clip.loss")


# float32 logits scaled by t = 50 in another order than open_clip's (t * (x @ y) against (t * x) @ y) differ by a
# few ulps of t: gradients of about 0.1 moved by up to ~3e-6; a wrong formula moves them by 1e-2 and more.
FLOAT32_SCALED = 1e-5


def _features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised (8, 16) image and text features, leaves of the graph."""
    return tuple(e.requires_grad_() for e in _embeddings(n=8, d=16, seed=seed))


def _values_and_grads(loss: torch.Tensor, leaves: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("t", [1 / 0.07, 10.0, 50.0])
def test_clip_loss_and_its_gradients_equal_open_clips(open_clip_loss, t) -> None:
    """open_clip's ClipLoss takes the multiplier t (its training loop clamps the parameter to ln 100); ours takes the
    log-scale and clamps in the forward pass. Inside the clamp they are one function of the features and log t."""
    img, txt = _features(seed=11)
    log_t = torch.tensor(math.log(t), requires_grad=True)
    ours = _values_and_grads(clip_loss(img, txt, log_t), (img, txt, log_t))
    theirs = _values_and_grads(open_clip_loss.ClipLoss()(img, txt, log_t.exp()), (img, txt, log_t))
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=FLOAT32_SCALED)


@pytest.mark.parametrize("t, bias", [(10.0, -10.0), (1 / 0.07, -2.0), (50.0, 3.0)])
def test_siglip_loss_and_its_gradients_equal_open_clips(open_clip_loss, t, bias) -> None:
    """open_clip's SigLipLoss divides the summed pair losses by the number of images, as `sigmoid_pair_loss` divides
    by its rows (one per local image); gradients agree for the features, the log-scale and the bias."""
    img, txt = _features(seed=12)
    log_t, b = torch.tensor(math.log(t), requires_grad=True), torch.tensor(bias, requires_grad=True)
    ours = _values_and_grads(siglip_loss(img, txt, log_t, b), (img, txt, log_t, b))
    theirs = _values_and_grads(open_clip_loss.SigLipLoss()(img, txt, log_t.exp(), b), (img, txt, log_t, b))
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=FLOAT32_SCALED)


def test_a_log_scale_past_ln_100_scores_as_open_clips_clamped_parameter(open_clip_loss) -> None:
    """Where open_clip would have clamped its parameter to ln 100 before the step, our forward pass clamps it."""
    img, txt = (e.detach() for e in _features(seed=13))
    beyond, hundred, bias = torch.tensor(6.0), torch.tensor(100.0), torch.tensor(-10.0)
    torch.testing.assert_close(clip_loss(img, txt, beyond), open_clip_loss.ClipLoss()(img, txt, hundred))
    theirs = open_clip_loss.SigLipLoss()(img, txt, hundred, bias)
    torch.testing.assert_close(siglip_loss(img, txt, beyond, bias), theirs)


def test_clip_loss_of_identical_embeddings_is_ln_n() -> None:
    same = F.normalize(torch.ones(4, 8), dim=-1)  # every logit equal -> uniform 4-way softmax
    assert clip_loss(same, same, torch.tensor(2.0)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_siglip_loss_matches_loop_reference() -> None:
    img, txt = _embeddings(seed=1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    expected = _reference_sigmoid(10.0 * img @ txt.T - 10.0, offset=0)
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(expected, rel=1e-5)


def test_sigmoid_pair_loss_with_offset() -> None:
    """Rows of one rank (3 images) against 9 gathered captions, positives from column 3 on (rank 1 of 3)."""
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(2)) * 4
    assert sigmoid_pair_loss(logits, 3).item() == pytest.approx(_reference_sigmoid(logits, 3), rel=1e-5)


def test_logit_scale_is_clamped_to_ln_100() -> None:
    cosine = torch.ones(2, 2)
    high = torch.tensor(10.0, requires_grad=True)
    logits = scale_logits(cosine, high)
    assert torch.allclose(logits, torch.full((2, 2), 100.0))
    logits.sum().backward()
    assert high.grad.item() == 0.0  # at the bound the clamp stops the gradient; the parameter is untouched
    assert high.item() == 10.0
    assert torch.allclose(scale_logits(cosine, torch.tensor(-3.0)), cosine)  # lower bound ln 1: t >= 1
    assert torch.allclose(scale_logits(cosine, torch.tensor(1.0), torch.tensor(-2.0)), cosine * math.e - 2.0)


def test_loss_modules_return_named_terms() -> None:
    img, txt = _embeddings()
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    clip = CLIPLoss()(ContrastiveOutput(img, txt, scale, None))
    siglip = SigLIPLoss()(ContrastiveOutput(img, txt, scale, bias))
    llip = LlipLoss()(LlipOutput(scale_logits(img @ txt.T, scale, bias), scale, bias))
    assert isinstance(clip, LossOutput) and set(clip.terms) == {"itc"}
    assert torch.equal(clip.total, clip.terms["itc"]) and clip.stats["logit_scale"].item() == pytest.approx(10.0)
    assert set(siglip.terms) == {"sigmoid"} and siglip.stats["logit_bias"].item() == -10.0
    assert llip.total.item() == pytest.approx(siglip.total.item(), rel=1e-6)  # unconditioned Llip == SigLIP
    with pytest.raises(ValueError, match="logit_bias"):
        SigLIPLoss()(ContrastiveOutput(img, txt, scale, None))


def test_loss_output_total_is_sum_of_terms() -> None:
    out = LossOutput.from_terms({"a": torch.tensor(1.5), "b": torch.tensor(2.0)})
    assert out.total.item() == 3.5 and out.stats == {}
