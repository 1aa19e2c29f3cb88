"""The Q-Former and BLIP-2's stage-1 objectives: the three masks cell by cell, the masks' effect in the model,
where each loss sends gradients, BERT initialisation, and the ITM hard-negative miner."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightning_vlm.adapters.qformer import QFormer, attention_mask
from lightning_vlm.encoders import VisionEncoder
from lightning_vlm.losses import BLIP2Loss, next_token_loss
from lightning_vlm.models.blip2 import BLIP2, TextBatch
from lightning_vlm.models.similarity import mine_hard_negatives, query_text_similarity

Q = 3
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_VIT = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}


def test_unimodal_mask_cell_by_cell():
    allowed = attention_mask(2, torch.tensor([[1, 1, 0]]), "unimodal")[0].int().tolist()
    #            q0 q1 t0 t1 t2(pad)
    assert allowed == [[1, 1, 0, 0, 0],  # q0: queries only
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0],  # t0: text only, never padding
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 0]]


def test_bidirectional_mask_cell_by_cell():
    allowed = attention_mask(2, torch.tensor([[1, 1, 0]]), "bidirectional")[0].int().tolist()
    assert allowed == [[1, 1, 1, 1, 0]] * 5


def test_multimodal_causal_mask_cell_by_cell():
    allowed = attention_mask(2, torch.tensor([[1, 1, 1, 0]]), "multimodal_causal")[0].int().tolist()
    #            q0 q1 t0 t1 t2 t3(pad)
    assert allowed == [[1, 1, 0, 0, 0, 0],  # queries never see text
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],  # t0: every query and itself
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 1, 0]]  # the padded row sees no padding either


def test_unknown_mask_kind_is_named():
    with pytest.raises(ValueError, match="sideways"):
        attention_mask(1, torch.ones(1, 2), "sideways")


@pytest.fixture
def blip2(tiny_benchmark) -> BLIP2:
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT).requires_grad_(False)
    return BLIP2(vision, lambda width: QFormer(width, config=TINY_BERT, tokenizer=tiny_benchmark, num_queries=Q,
                                               cross_attention_freq=1), embed_dim=16)


def _text(batch: int = 4, length: int = 6) -> TextBatch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 40, (batch, length), generator=g)
    ids[:, 0] = 2  # [BOS], the CLS of this tokenizer
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return TextBatch(ids, mask)


def test_unimodal_pass_equals_separate_image_and_text_passes(blip2):
    """ITC's joint pass under the unimodal mask gives exactly what the two modalities give alone (the eval path)."""
    image, text = blip2.image_features(torch.randn(4, 3, 32, 32)), _text()
    joint = blip2.qformer(image, text.input_ids, text.attention_mask, mask="unimodal")
    alone_queries = blip2.qformer(image=image).queries
    alone_text = blip2.qformer(input_ids=text.input_ids, text_mask=text.attention_mask).text
    assert torch.allclose(joint.queries, alone_queries, atol=1e-5)
    assert torch.allclose(joint.text, alone_text, atol=1e-5)
    mixed = blip2.qformer(image, text.input_ids, text.attention_mask, mask="bidirectional")
    assert not torch.allclose(mixed.queries, alone_queries, atol=1e-3)  # the other masks do mix modalities


def test_itg_text_never_sees_later_text_and_queries_never_see_text(blip2):
    image, text = blip2.image_features(torch.randn(2, 3, 32, 32)), _text(2)
    changed = text.input_ids.clone()
    changed[:, 4] = 9
    run = lambda ids: blip2.qformer(image, ids, text.attention_mask, mask="multimodal_causal", decoder=True)  # noqa: E731
    before, after = run(text.input_ids), run(changed)
    assert torch.allclose(before.text[:, :4], after.text[:, :4], atol=1e-6)  # earlier tokens untouched
    assert not torch.allclose(before.text[:, 4:], after.text[:, 4:])
    assert torch.allclose(before.queries, after.queries, atol=1e-6)


GRAD_REACH = {
    # loss: (parts that must get gradient, parts that must not)
    "itc": ({"vision_norm", "qformer", "vision_proj", "text_proj", "logit_scale"},
            {"itm_head", "itg_head.transform", "vision"}),
    "itm": ({"vision_norm", "qformer", "itm_head"},
            {"vision_proj", "text_proj", "logit_scale", "itg_head.transform", "vision"}),
    "itg": ({"vision_norm", "qformer", "itg_head.transform"},
            {"vision_proj", "text_proj", "itm_head", "logit_scale", "vision"}),
}


@pytest.mark.parametrize("loss", list(GRAD_REACH))
def test_each_loss_reaches_only_its_parts(blip2, loss):
    text = _text()
    out = blip2(torch.randn(4, 3, 32, 32), text, objectives={loss})
    value = BLIP2Loss({name: float(name == loss) for name in ("itc", "itm", "itg", "lm")})(out).total
    blip2.zero_grad()
    value.backward()
    reach, never = GRAD_REACH[loss]

    def touched(part: str) -> bool:
        params = [blip2.logit_scale] if part == "logit_scale" else list(blip2.get_submodule(part).parameters())
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    assert all(touched(part) for part in reach), [p for p in reach if not touched(p)]
    assert not any(touched(part) for part in never), [p for p in never if touched(p)]
    assert not blip2.vision(torch.randn(1, 3, 32, 32)).tokens.requires_grad  # the frozen encoder is not in the graph


def test_itg_loss_is_next_token_cross_entropy_on_real_tokens(blip2):
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out = blip2(torch.randn(2, 3, 32, 32), TextBatch(ids, mask), objectives={"itg"})
    logits = out.itg.hidden  # (B, T, V): the ITG head scores every position
    terms = [-logits[b, t].log_softmax(-1)[ids[b, t + 1]] for b in range(2) for t in range(3) if mask[b, t + 1]]
    assert next_token_loss(out.itg).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_similarity_is_the_best_query():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two queries
    texts = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    assert query_text_similarity(queries, texts).tolist() == [[pytest.approx(0.8), pytest.approx(0.0)]]


def test_hard_negative_miner_never_picks_the_match_or_its_duplicates():
    similarity = torch.tensor([[9.0, 8.0, 0.0, -5.0], [8.0, 9.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # texts 0 and 1 are the same caption
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([mine_hard_negatives(similarity, same, g) for _ in range(200)])
    assert not (picks[:, 0] == 0).any() and not (picks[:, 0] == 1).any()
    assert (picks[:, 0] == 2).float().mean() > 0.9  # the hardest remaining one, by softmax weight
    assert set(picks[:, 3].tolist()) == {0, 1, 2}


def test_qformer_from_a_bert_checkpoint_reads_text_like_bert(tmp_path, tiny_benchmark):
    """Initialised from a BERT folder, a text-only pass IS that BERT; cross-attention is reported as new."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, **TINY_BERT, max_position_embeddings=32)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.normal_()  # folded into positions: must still match
    bert.save_pretrained(tmp_path)
    qformer = QFormer(48, name_or_path=str(tmp_path), tokenizer=tiny_benchmark, num_queries=Q).eval()
    ids, mask = _text(2).input_ids, _text(2).attention_mask
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    got = qformer(input_ids=ids, text_mask=mask).text
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    new = qformer.load_report["newly_initialised"]
    assert "query_tokens" in new and "decoder_token" in new
    assert any(name.startswith("layers.0.crossattention.") for name in new)
    assert not any(".attention." in name or "ffn" in name for name in new)
    assert qformer.load_report["unused"] == []
