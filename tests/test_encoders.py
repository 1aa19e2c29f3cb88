"""Encoders and contrastive models on tiny configs: shapes, extra tokens, and eval API == training logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_vlm.data.synthetic.tokenizer import train_tokenizer
from lightning_vlm.encoders import ConvStem, TextEncoder, VisionEncoder
from lightning_vlm.losses import LlipLoss
from lightning_vlm.losses.contrastive import sigmoid_pair_loss
from lightning_vlm.models import DualEncoder, Llip
from lightning_vlm.models.contrastive import HardNegatives
from lightning_vlm.models.similarity import scale_logits

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
CNN = {"norm_layer": "groupnorm1", "channels": [8, 16, 32, 64], "stem_width": 8, "layers": [1, 1, 1, 1]}
VOCAB = 50


def _text_batch(n: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 4:] = 0  # right padding on the first caption
    return ids, mask


def test_vision_encoder_tiny_vit_shapes() -> None:
    enc = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT)
    out = enc(torch.randn(2, 3, 32, 32))
    assert enc.width == 64
    assert out.tokens.shape == (2, 1 + 16, 64) and out.patch_tokens.shape == (2, 16, 64)
    assert torch.equal(out.patch_tokens, out.tokens[:, 1:])
    assert out.pooled.shape == (2, 64) and torch.equal(out.pooled, out.tokens[:, 0])  # vit pools the cls token
    assert out.extra_tokens is None
    assert enc.data_config["input_size"] == (3, 32, 32) and len(enc.data_config["mean"]) == 3


def test_vision_encoder_extra_tokens() -> None:
    torch.manual_seed(0)
    enc = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=3, overrides=TINY_VIT).eval()
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.extra_tokens.shape == (2, 3, 64) and out.tokens.shape == (2, 17, 64)
    out.extra_tokens.sum().backward()
    assert enc.extra_tokens.grad is not None and enc.extra_tokens.grad.abs().sum() > 0


def test_a_frozen_vision_encoder_keeps_no_graph_and_a_trainable_one_does() -> None:
    enc = VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT)
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert enc(pixels).tokens.grad_fn is not None
    enc.requires_grad_(False)
    out = enc(pixels)
    assert out.tokens.grad_fn is None and out.pooled.grad_fn is None
    enc.model.blocks[0].requires_grad_(True)  # partly trainable: the graph is kept
    assert enc(pixels).tokens.grad_fn is not None


def test_vit_stages_reproduce_timm_forward_features() -> None:
    """The timm stages run around the extra tokens equal timm's own forward_features (guards against timm changes)."""
    torch.manual_seed(0)
    enc = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=1, overrides=TINY_VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    m = enc.model
    manual = m.norm(m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))))
    assert torch.allclose(manual, m.forward_features(x))


def test_hybrid_vit_tokens_are_the_cnn_feature_map_cells() -> None:
    """A ConvStem's stage-2 map (stride 8) of a 32-px image gives 4x4 tokens; Llip's extra tokens still attach."""
    torch.manual_seed(0)
    stem = ConvStem("resnet10t", out_index=2, overrides={"norm_layer": "groupnorm1", "channels": [8, 16, 32, 64],
                                                         "stem_width": 8})
    vit = {key: value for key, value in TINY_VIT.items() if key != "patch_size"}  # the stem sets patch size 1
    enc = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=2, overrides=vit, stem=stem).eval()
    x = torch.randn(2, 3, 32, 32)
    out = enc(x)
    assert out.tokens.shape == (2, 1 + 16, 64) and out.extra_tokens.shape == (2, 2, 64)
    cells = enc.model.patch_embed.proj(enc.model.patch_embed.backbone(x)[-1]).flatten(2).transpose(1, 2)
    assert torch.allclose(enc.model.patch_embed(x), cells)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())  # no batch statistics to leak pairs


def test_vision_encoder_cnn_tokens_and_extra_tokens_error() -> None:
    enc = VisionEncoder("resnet18")
    out = enc(torch.randn(1, 3, 64, 64))
    assert out.tokens.shape == (1, 4, 512) and out.pooled.shape == (1, 512) and enc.width == 512
    with pytest.raises(ValueError, match="ViT-style"):
        VisionEncoder("resnet18", num_extra_tokens=2)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_encoder_from_config(pooling: str) -> None:
    enc = TextEncoder(vocab_size=VOCAB, pooling=pooling).eval()
    ids, mask = _text_batch()
    out = enc(ids, mask)
    assert enc.width == 64 and enc.model.config.vocab_size == VOCAB
    assert out.tokens.shape == (3, 7, 64) and out.pooled.shape == (3, 64)
    hidden = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state  # the transformer's own output
    assert torch.allclose(out.tokens, hidden, atol=1e-6)
    expected = hidden[:, 0] if pooling == "cls" else hidden[0, :4].mean(0)  # caption 0 has 4 real tokens
    assert torch.allclose(out.pooled if pooling == "cls" else out.pooled[0], expected, atol=1e-6)
    assert not torch.allclose(out.pooled[0], hidden[0, 1], atol=1e-3)  # pooling reads one position, not any


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_length_buckets_encode_short_rows_short_and_equal_the_whole_batch(pooling: str) -> None:
    torch.manual_seed(0)
    whole = TextEncoder(vocab_size=VOCAB, pooling=pooling).eval()
    bucketed = TextEncoder(vocab_size=VOCAB, pooling=pooling, length_buckets=2).eval()
    bucketed.load_state_dict(whole.state_dict())
    ids, _ = _text_batch(n=4, length=9)
    mask = (torch.arange(9) < torch.tensor([[9], [3], [7], [2]])).long()
    shapes = []
    bucketed.model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    expected, out = whole(ids, mask), bucketed(ids, mask)
    assert shapes == [(2, 3), (2, 9)]  # rows 3, 1 (lengths 2, 3) and rows 2, 0 (lengths 7, 9)
    assert torch.allclose(out.pooled, expected.pooled, atol=1e-5)
    real = mask.bool()
    assert torch.allclose(out.tokens[real], expected.tokens[real], atol=1e-5)
    out.pooled.sum().backward()
    expected.pooled.sum().backward()
    for (name, a), b in zip(bucketed.named_parameters(), whole.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    left_padded = mask.flip(1)
    shapes.clear()
    bucketed(ids, left_padded)
    assert shapes == [(4, 9)]  # trimming would cut real tokens: encoded whole
    with pytest.raises(ValueError, match="length_buckets"):
        TextEncoder(vocab_size=VOCAB, length_buckets=0)


def test_text_encoder_from_pretrained_folder(tmp_path) -> None:
    """The from_pretrained path (as for all-MiniLM-L6-v2) on a saved tiny model; a larger tokenizer resizes."""
    built = TextEncoder(vocab_size=VOCAB).eval()
    built.model.save_pretrained(tmp_path)
    train_tokenizer(["a small red circle left of a large blue square."], tmp_path / "tokenizer.json")
    loaded = TextEncoder(str(tmp_path), vocab_size=VOCAB).eval()
    ids, mask = _text_batch()
    assert torch.allclose(loaded(ids, mask).pooled, built(ids, mask).pooled, atol=1e-6)
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer.encode("red circle")) == ["red", "circle"]
    by_tokenizer = TextEncoder(str(tmp_path))  # the declared tokenizer sizes the embeddings
    assert by_tokenizer.model.config.vocab_size == len(by_tokenizer.tokenizer) != VOCAB


def test_text_encoder_config_overrides_and_errors() -> None:
    assert TextEncoder(vocab_size=VOCAB, config={"hidden_size": 32, "num_attention_heads": 4}).width == 32
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder()
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(vocab_size=VOCAB, pooling="max")


def _towers(extra: int = 0) -> tuple[VisionEncoder, TextEncoder]:
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=extra, overrides=TINY_VIT)
    return vision, TextEncoder(vocab_size=VOCAB)


@pytest.mark.parametrize("valid", [[False, True, False, True], [False, False, False, False]], ids=["some", "none"])
def test_hard_negatives_encode_only_real_slots_and_equal_encoding_alone(valid: list[bool]) -> None:
    text = TextEncoder(vocab_size=VOCAB).eval()
    ids, mask = _text_batch(n=4, length=9)
    mask[1, 5:], mask[3, 6:] = 0, 0  # the longest real negative ends at 6: the batch is trimmed to it
    calls = []

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        calls.append(input_ids.shape)
        return text(input_ids, attention_mask).pooled

    embeddings = HardNegatives(ids, mask, torch.tensor(valid)).encode(encode)
    assert embeddings.shape == (4, text.width)
    for row, real in enumerate(valid):
        alone = text(ids[row : row + 1], mask[row : row + 1]).pooled[0]
        assert torch.allclose(embeddings[row], alone, atol=1e-5) if real else not embeddings[row].any()
    assert calls == ([(2, 6)] if any(valid) else [(1, 4)])  # with none real, only slot 0 runs (for the width)


def test_dual_encoder_similarity_matches_training_logits() -> None:
    model = DualEncoder(*_towers(), embed_dim=32, logit_scale_init=math.log(10), logit_bias_init=-10.0).eval()
    pixels, (ids, mask) = torch.randn(3, 3, 32, 32), _text_batch()
    out = model(pixels, ids, mask)
    assert out.image_emb.shape == (3, 32) and out.text_emb.shape == (3, 32)
    assert torch.allclose(out.image_emb.norm(dim=-1), torch.ones(3))
    sim = model.similarity(model.encode_images(pixels), model.encode_texts(ids, mask))
    assert torch.allclose(sim, scale_logits(out.image_emb @ out.text_emb.T, out.logit_scale, out.logit_bias))
    assert DualEncoder(*_towers()).heads.logit_bias is None


def test_llip_shapes_and_similarity_matches_training_logits() -> None:
    model = Llip(*_towers(extra=4), embed_dim=32, num_heads=4).eval()
    pixels, (ids, mask) = torch.randn(3, 3, 32, 32), _text_batch()
    out = model(pixels, ids, mask)
    images, texts = model.encode_images(pixels), model.encode_texts(ids, mask)
    assert out.logits.shape == (3, 3) and images.shape == (3, 4, 32) and texts.shape == (3, 32)
    assert torch.allclose(model.similarity(images, texts), out.logits, atol=1e-5)
    assert torch.allclose(model.similarity(images, texts, max_pairs=2), out.logits, atol=1e-5)  # chunked
    with pytest.raises(ValueError, match="num_extra_tokens"):
        Llip(*_towers())


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_llip_conditioning_matches_per_pair_attention(temperature: float) -> None:
    """Each (image i, caption j) logit equals multi-head attention of caption j over image i's mixture tokens, its
    logits divided by the softmax temperature."""
    model = Llip(*_towers(extra=4), embed_dim=32, num_heads=4, attention_temperature=temperature).eval()
    attn, heads = model.mixture_attn, model.heads
    images = torch.randn(2, 4, 32)
    texts = F.normalize(torch.randn(3, 32), dim=-1)
    expected = torch.empty(2, 3)
    for i in range(2):
        for j in range(3):
            q = attn.q(texts[j]).view(4, 1, 8)  # (heads, 1 query, head dim)
            k = attn.k(images[i]).view(4, 4, 8).transpose(0, 1)  # (heads, K tokens, head dim)
            v = attn.v(images[i]).view(4, 4, 8).transpose(0, 1)
            mixed = attn.out(F.scaled_dot_product_attention(q, k, v, scale=8**-0.5 / temperature).reshape(32))
            cosine = F.normalize(mixed, dim=-1) @ texts[j]
            expected[i, j] = heads.logit_scale.exp() * cosine + heads.logit_bias
    assert torch.allclose(model.similarity(images, texts), expected, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        Llip(*_towers(extra=4), embed_dim=32, attention_temperature=0.0)


def test_llip_mixture_entropy_is_that_of_each_images_weights_under_its_own_caption() -> None:
    """Normalised entropy of the per-head softmax over K tokens for the (image i, caption i) pairs: a hand-computed
    reference; 1 at a temperature so high the weights are uniform; none for a single mixture token."""
    model = Llip(*_towers(extra=4), embed_dim=32, num_heads=4, attention_temperature=0.1).eval()
    attn = model.mixture_attn
    images, texts = torch.randn(3, 4, 32), F.normalize(torch.randn(3, 32), dim=-1)
    entropies = []
    for i in range(3):
        q = attn.q(texts[i]).view(4, 8)  # (heads, head dim)
        k = attn.k(images[i]).view(4, 4, 8)  # (K tokens, heads, head dim)
        weights = (torch.einsum("hd,khd->hk", q, k) * 8**-0.5 / 0.1).softmax(-1)
        entropies.append(-(weights * weights.log()).sum(-1) / math.log(4))
    expected = torch.stack(entropies).mean()
    assert 0.05 < expected < 0.95  # sharp enough that the check is not the uniform case
    torch.testing.assert_close(model.mixture_entropy(images, texts), expected)
    attn.temperature = 1e6
    torch.testing.assert_close(model.mixture_entropy(images, texts), torch.tensor(1.0))
    assert model.mixture_entropy(images[:, :1], texts) is None
    pixels, (ids, mask) = torch.randn(3, 3, 32, 32), _text_batch()
    out = model(pixels, ids, mask)
    assert LlipLoss()(out).stats["mixture_entropy"] == out.mixture_entropy


def test_llip_pools_mixture_tokens_from_a_cnn() -> None:
    """A CNN appends no tokens: its pooled vector plus K learned queries' reads of its feature map give the mixture
    tokens instead, each equal to the pooled vector at initialisation."""
    torch.manual_seed(0)
    cnn = VisionEncoder("resnet10t", overrides=CNN)
    model = Llip(cnn, TextEncoder(vocab_size=VOCAB), embed_dim=32, num_heads=4, num_mixture_tokens=3).eval()
    pixels, (ids, mask) = torch.randn(2, 3, 64, 64), _text_batch()
    images = model.encode_images(pixels)
    assert images.shape == (2, 3, 32)  # 3 mixture tokens read from the 2 x 2 map
    pooled = model.heads.image_proj(cnn(pixels).pooled)
    assert torch.allclose(images, pooled.unsqueeze(1).expand(-1, 3, -1), atol=1e-6)  # at the start: the pooled vector
    torch.nn.init.normal_(model.mixture_pool.norm.weight)
    expected = model.heads.image_proj(cnn(pixels).pooled.unsqueeze(1) + model.mixture_pool(cnn(pixels).tokens))
    assert torch.allclose(model.encode_images(pixels), expected, atol=1e-6)
    out = model(pixels[:2].repeat(2, 1, 1, 1)[:3], ids, mask)
    assert torch.allclose(model.similarity(model.encode_images(pixels[:2].repeat(2, 1, 1, 1)[:3]),
                                          model.encode_texts(ids, mask)), out.logits, atol=1e-5)
    out.logits.sum().backward()
    assert model.mixture_pool.queries.grad.abs().sum() > 0 and cnn.model.conv1[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one"):
        Llip(*_towers(extra=4), num_mixture_tokens=3)


def test_llip_uniform_anchor_scores_the_uniform_mix_and_trains_no_query_or_key() -> None:
    """The anchor logits are the conditioned logits in the uniform limit (an infinite mixing temperature); LlipLoss
    adds them as term "anchor" times its weight, and that term sends no gradient to the mixing queries or keys."""
    model = Llip(*_towers(extra=4), embed_dim=32, num_heads=4, uniform_anchor=True).eval()
    pixels, (ids, mask) = torch.randn(3, 3, 32, 32), _text_batch()
    out = model(pixels, ids, mask)
    model.mixture_attn.temperature = 1e9
    uniform = model.similarity(model.encode_images(pixels), model.encode_texts(ids, mask))
    torch.testing.assert_close(out.anchor_logits, uniform, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.anchor_logits, out.logits, atol=1e-3)  # the conditioned logits differ
    terms = LlipLoss(weights={"anchor": 0.5})(out).terms
    torch.testing.assert_close(terms["anchor"], 0.5 * sigmoid_pair_loss(out.anchor_logits, 0))
    terms["anchor"].backward()
    attn = model.mixture_attn
    assert attn.q.weight.grad is None and attn.k.weight.grad is None and attn.v.weight.grad.abs().sum() > 0
    assert Llip(*_towers(extra=4))(pixels, ids, mask).anchor_logits is None  # off by default: no "anchor" term


def test_llip_mixture_query_std_sets_how_distinct_the_reads_start() -> None:
    """At the default 0.02 the pooler's K queries all start reading the map's mean, so the mixture tokens start
    alike; at 1 each starts reading its own mix of the map (its attention far from uniform)."""
    departures = {}
    for std in (0.02, 1.0):
        torch.manual_seed(0)
        model = Llip(VisionEncoder("resnet10t", overrides=CNN), TextEncoder(vocab_size=VOCAB), embed_dim=32,
                     num_heads=1, num_mixture_tokens=4, mixture_query_std=std)
        pool, tokens = model.mixture_pool, model.vision(torch.randn(2, 3, 64, 64)).tokens
        _, weights = pool.attention(pool.queries.expand(2, -1, -1), tokens, tokens, need_weights=True)
        assert torch.allclose(pool.queries.std(), torch.tensor(std), rtol=0.1)
        departures[std] = (weights - 1 / tokens.shape[1]).abs().max()
    assert departures[0.02] < 1e-3 and departures[1.0] > 20 * departures[0.02]


def test_cnn_runs_channels_last_with_the_same_outputs() -> None:
    torch.manual_seed(0)
    cnn = VisionEncoder("resnet10t", overrides=CNN)
    assert cnn.channels_last and cnn.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain = VisionEncoder("resnet10t", overrides=CNN, channels_last=False)
    plain.load_state_dict(cnn.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(cnn(pixels).tokens, plain(pixels).tokens, rtol=1e-4, atol=1e-5)
    assert not VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT).channels_last


def test_unfused_attention_skips_sdpa_and_gives_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    fused = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=2, overrides=TINY_VIT)
    unfused = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=2, overrides=TINY_VIT, fused_attention=False)
    unfused.load_state_dict(fused.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    expected = fused(pixels).tokens

    def no_sdpa(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention called with fused_attention=False")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    torch.testing.assert_close(unfused(pixels).tokens, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="fused_attention=False"):
        fused(pixels)  # the patch is seen by timm: the default path does call SDPA
