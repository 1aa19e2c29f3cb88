"""Llip with the authors' head (`Llip(authors_head=True)`, facebookresearch/Llip): per-mixture-token key and value
projections, several heads, the query from the text's hidden state through its own projection; its logits, its loss
and its template-averaged zero-shot classification against hand computations of the formula on tiny tensors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed_contrastive import LlipWithNegatives, _copy_captions, _free_port, _loss_and_grads, _tokens
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from lightning_vlm.cli import load_model
from lightning_vlm.compare.config import load_comparison
from lightning_vlm.compare.run import check_entries
from lightning_vlm.data.datamodule import ShardDataModule
from lightning_vlm.encoders import TextEncoder, VisionEncoder
from lightning_vlm.eval.zero_shot import zero_shot_predictions
from lightning_vlm.losses import LlipLoss
from lightning_vlm.models import Llip
from lightning_vlm.paradigms.contrastive import Contrastive

from test_contrastive_paradigm import chance_loss, standardised

REPO = Path(__file__).parents[1]
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)  # vision width 64
TEXT = {"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
VOCAB, K, E, HEADS, TEMPERATURE = 50, 4, 32, 4, 0.7


def authors_llip(**kwargs) -> Llip:
    """A tiny Llip with the authors' head: K = 4 mixture tokens of width 64, text width 48, E = 32 in 4 heads."""
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=K, overrides=TINY_VIT)
    return Llip(vision, TextEncoder(vocab_size=VOCAB, config=TEXT, pooling="mean"), embed_dim=E, num_heads=HEADS,
                attention_temperature=TEMPERATURE, authors_head=True, **kwargs).eval()


def captions(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct random captions of 7 tokens, the first right-padded."""
    ids = torch.randint(0, VOCAB, (n, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[0, 4:] = 0
    return ids, mask


def conditioned(model: Llip, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The authors' caption-conditioned image embedding, written out for one image's (K, D_v) mixture tokens and one
    caption's (D_t,) hidden state: k_n = m_n W^k_n, v_n = m_n W^v_n, q = W^q h, per head softmax_n(q . k_n / tau) with
    tau = temperature * sqrt(d), the heads' mixes concatenated, then W^out."""
    attn, d = model.mixture_attn, E // HEADS
    keys = torch.stack([tokens[n] @ attn.k.weight[n] for n in range(K)]).view(K, HEADS, d)
    values = torch.stack([tokens[n] @ attn.v.weight[n] for n in range(K)]).view(K, HEADS, d)
    query = (attn.q.weight @ hidden).view(HEADS, d)
    heads = []
    for h in range(HEADS):
        weights = torch.softmax(keys[:, h] @ query[h] / (TEMPERATURE * math.sqrt(d)), dim=0)
        heads.append(weights @ values[:, h])
    return attn.out.weight @ torch.cat(heads)


def hand_logits(model: Llip, mixture: torch.Tensor, hidden: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
    """t * cos(conditioned image i | caption j, caption j's unit embedding) + b, pair by pair."""
    logits = torch.empty(len(mixture), len(hidden))
    for i in range(len(mixture)):
        for j in range(len(hidden)):
            cosine = F.normalize(conditioned(model, mixture[i], hidden[j]), dim=0) @ caption_emb[j]
            logits[i, j] = model.heads.logit_scale.exp() * cosine + model.heads.logit_bias
    return logits


def test_each_mixture_token_has_its_own_key_and_value_projection() -> None:
    """K separate (D_v, E) key and value maps straight from the encoder's width (no shared image projection, no
    biases): one vector placed at every token position gets K different keys, each its position's own map of it."""
    model = authors_llip()
    attn = model.mixture_attn
    assert attn.k.weight.shape == attn.v.weight.shape == (K, 64, E)
    assert not any(torch.allclose(attn.k.weight[0], attn.k.weight[n]) for n in range(1, K))
    assert isinstance(model.heads.image_proj, torch.nn.Identity)
    assert attn.q.bias is None and attn.out.bias is None
    assert not any(name.endswith("bias") for name, _ in attn.named_parameters())
    same = torch.randn(64).expand(1, K, 64)
    keys = attn.k(same)[0]
    torch.testing.assert_close(keys, torch.stack([same[0, n] @ attn.k.weight[n] for n in range(K)]))
    assert not torch.allclose(keys[0], keys[1])
    ours = Llip(model.vision, model.text, embed_dim=E, num_heads=HEADS).mixture_attn  # the kept head: shared maps
    shared_keys = ours.k(torch.randn(E).expand(1, K, E))[0]
    torch.testing.assert_close(shared_keys[0], shared_keys[1])


def test_several_heads_each_weigh_the_k_tokens_summing_to_one() -> None:
    model = authors_llip()
    pixels, (ids, mask) = torch.randn(2, 3, 32, 32), captions()
    queries, _ = model.queries_and_captions(model.encode_texts(ids, mask))
    weights = model.mixture_attn.weights(model.encode_images(pixels), queries)
    assert weights.shape == (2, 3, HEADS, K)  # (images, captions, heads, mixture tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, HEADS))
    assert (weights > 0).all()
    assert not torch.allclose(weights[:, :, 0], weights[:, :, 1], atol=1e-3)  # the heads read the tokens differently


def test_the_query_is_the_texts_hidden_state_through_its_own_projection() -> None:
    """The text gives its pooled final hidden state (read by the query map W^q) beside its unit caption embedding
    (text_proj): changing W^q changes the image's embedding and not the caption's, and the image embedding changes
    with the caption that conditions it."""
    model = authors_llip()
    pixels, (ids, mask) = torch.randn(2, 3, 32, 32), captions()
    texts, images = model.encode_texts(ids, mask), model.encode_images(pixels)
    pooled = model.text(ids, mask).pooled
    hidden, caption_emb = model.queries_and_captions(texts)
    assert texts.shape == (3, 48 + E) and images.shape == (2, K, 64)
    torch.testing.assert_close(hidden, pooled)
    torch.testing.assert_close(caption_emb, F.normalize(model.heads.text_proj(pooled), dim=-1))
    assert model.mixture_attn.q.weight.shape == (E, 48)
    assert model.mixture_attn.q.weight.data_ptr() != model.heads.text_proj.weight.data_ptr()
    weights, values = model.mixture_attn(images, hidden)
    embedded = weights @ values  # (I, T, E): image i conditioned on caption t (the authors' head has no output bias)
    torch.testing.assert_close(embedded[1, 2], conditioned(model, images[1], hidden[2]))
    assert not torch.allclose(embedded[0, 0], embedded[0, 1], atol=1e-4)  # one image, two captions, two embeddings
    before = model.similarity(images, texts)
    with torch.no_grad():
        model.mixture_attn.q.weight.mul_(3.0)
    assert not torch.allclose(model.similarity(images, texts), before, atol=1e-4)
    torch.testing.assert_close(model.encode_texts(ids, mask), texts)  # the caption embedding does not use W^q


def test_logits_and_loss_match_the_formula_by_hand() -> None:
    """Training logits = eval similarity = the pair-by-pair formula; LlipLoss = SigLIP's
    -sum_ij log sigmoid(z_ij logit_ij) / n on them, z = +1 on the diagonal and -1 elsewhere."""
    model = authors_llip()
    pixels, (ids, mask) = torch.randn(3, 3, 32, 32), captions()
    out = model(pixels, ids, mask)
    hidden, caption_emb = model.queries_and_captions(model.encode_texts(ids, mask))
    expected = hand_logits(model, model.encode_images(pixels), hidden, caption_emb)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    chunked = model.similarity(model.encode_images(pixels), model.encode_texts(ids, mask), max_pairs=2)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)
    signs = 2 * torch.eye(3) - 1
    loss = LlipLoss()(out)
    torch.testing.assert_close(loss.total, -F.logsigmoid(signs * expected).sum() / 3, atol=1e-5, rtol=1e-5)
    assert 0.0 <= out.mixture_entropy <= 1.0
    with FlopCounterMode(display=False) as counter:  # as BudgetMeter measures a training step
        model(pixels, ids, mask).logits.sum().backward()
    assert counter.get_total_flops() > 0


def test_zero_shot_conditions_each_image_on_the_template_averaged_query() -> None:
    """Prompt ensembling as in the authors' evaluation: per class, the hidden states' mean over templates queries the
    image (the query map is linear: the mean query) and the mean of the unit caption embeddings, renormalised, is
    compared with the conditioned image; the class with the highest cosine wins. Averaging the scores instead (the
    kept head's ensembling) picks another class for some of these images."""
    model = authors_llip()
    with torch.no_grad():
        model.heads.text_proj.weight.normal_()  # captions far apart, so the ensemble's two forms disagree somewhere
    words = {word: i for i, word in enumerate("a an the red green blue photo of thing square .".split())}

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[words[w] for w in text.replace(".", " .").split()] for text in texts]
        length = max(map(len, ids))
        return (torch.tensor([row + [0] * (length - len(row)) for row in ids]),
                torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids]))

    classes, templates = ["red", "green", "blue"], ["a {} square.", "the {} thing.", "a photo of the {}."]
    images = model.encode_images(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    predicted = zero_shot_predictions(model, tokenize, images, classes, templates)
    with torch.no_grad():
        scores, averaged_scores = torch.empty(24, 3), torch.zeros(24, 3)
        for c, name in enumerate(classes):
            hidden, caption_emb = model.queries_and_captions(model.encode_texts(*tokenize(
                [template.format(name) for template in templates])))
            class_emb = F.normalize(caption_emb.mean(0), dim=0)
            for i in range(24):
                scores[i, c] = F.normalize(conditioned(model, images[i], hidden.mean(0)), dim=0) @ class_emb
            averaged_scores[:, c] = hand_logits(model, images, hidden, caption_emb).mean(1)
    assert torch.equal(predicted, scores.argmax(1))
    assert not torch.equal(predicted, averaged_scores.argmax(1))
    assert not torch.equal(zero_shot_predictions(model, tokenize, images, classes, templates, reduction="max"),
                           predicted)  # "max" still scores every template on its own


def test_every_trainable_parameter_learns_and_it_overfits_a_batch(tiny_benchmark) -> None:
    """With a CNN's pooled mixture tokens, as recipes/llip.yaml: every parameter gets a gradient (no unused projection
    left from the kept head), and the loss falls well below the collapsed solution's within 120 steps."""
    torch.manual_seed(0)
    cnn = VisionEncoder("resnet10t", overrides={"norm_layer": "groupnorm1", "channels": [8, 16, 32, 64],
                                                "stem_width": 8, "layers": [1, 1, 1, 1]})
    model = Llip(cnn, TextEncoder(tokenizer=tiny_benchmark, pooling="mean"), embed_dim=E, num_heads=HEADS,
                 num_mixture_tokens=K, authors_head=True)
    assert model.mixture_attn.k.weight.shape == (K, 64, E)
    paradigm = Contrastive(model, LlipLoss(), lr=1e-3, warmup_steps=1)
    batch = next(iter(ShardDataModule(root=tiny_benchmark, tasks={"contrastive": 1}, batch_size=8).train_dataloader()))
    args = (standardised(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"])
    optimizer = torch.optim.AdamW(paradigm.parameters(), lr=3e-4)
    losses = []
    for step in range(120):
        loss = paradigm.loss(paradigm.model(*args)).total
        optimizer.zero_grad()
        loss.backward()
        if step == 1:  # at step 0 the zero-initialised scales (ReZero pooler, last norms) gate their inputs' gradient
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * chance_loss("llip", 8), losses[::10]


def test_the_llip_authors_comparison_entry_passes_the_checks(tiny_benchmark, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the comparison names its recipes relative to the working directory
    comparison = load_comparison(REPO / "comparisons" / "contrastive.yaml")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(tiny_benchmark)  # where the recipe reads data and tokenizer
    monkeypatch.chdir(tmp_path)
    mine = [entry for entry in comparison.entries if entry.label == "llip-authors"]
    comparison = dataclasses.replace(comparison, root=REPO, entries=mine)
    answers = check_entries(comparison, tmp_path / "out", mine)
    assert set(comparison.yardstick) <= answers["llip-authors"]
    model = load_model(str(tmp_path / "out" / "checks" / "llip-authors" / "config.yaml")).model
    assert model.authors_head and model.mixture_attn.num_heads == 8


def ddp_case() -> tuple[LlipWithNegatives, tuple[torch.Tensor, ...]]:
    """The same seeded tiny authors' Llip and global batch of 8 pairs with 2 hard negatives each (one padded, one
    spelling another rank's caption) in every process."""
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=3,
                           overrides=dict(img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2))
    text = TextEncoder(vocab_size=40, config={"num_hidden_layers": 1, "hidden_size": 24, "num_attention_heads": 2})
    model = Llip(vision, text, embed_dim=16, num_heads=2, authors_head=True)
    captions, negatives = _tokens(8), _tokens(16)
    for caption, negative in zip(captions, negatives):
        _copy_captions(caption, negative)
    valid = torch.ones(16, dtype=torch.bool)
    valid[3] = False
    return LlipWithNegatives(model).eval(), (torch.randn(8, 3, 16, 16), *captions, *negatives, valid)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, inputs = ddp_case()
    local = tuple(x.chunk(2)[rank] for x in inputs)
    torch.save(_loss_and_grads(DistributedDataParallel(model), LlipLoss(), local), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path) -> None:
    """The text representation (hidden state beside caption embedding) gathers across ranks with its gradient: the
    mean of two gloo ranks' losses and their DDP-averaged gradients equal one process's on the global batch."""
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, inputs = ddp_case()
    single = _loss_and_grads(model, LlipLoss(), inputs)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"], atol=1e-5, rtol=1e-5)
    assert {key.removeprefix("module.") for key in ranks[0]} == set(single)
    assert "model.mixture_attn.q.weight" in single and "model.mixture_attn.k.weight" in single
    for key, grad in single.items():
        if key != "loss":
            torch.testing.assert_close(ranks[0][f"module.{key}"], grad, atol=1e-5, rtol=1e-4)
