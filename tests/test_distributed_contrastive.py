"""Two gloo processes on CPU give the same loss and gradients as one process on the global batch.

Each rank computes its local rows against columns gathered with gradients, so the per-rank loss is a
share of the global one: global loss = mean over ranks. The gathered columns send gradient back to
their owner rank (summed over every rank's loss), so each rank holds the gradient of the SUM of
per-rank losses; DDP then averages across ranks, which divides that sum by the world size and gives
exactly the gradient of the global loss. We therefore compare DDP's gradients with the one-process ones.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_vlm.distributed import gather_objects
from lightning_vlm.encoders import TextEncoder, VisionEncoder
from lightning_vlm.losses import CLIPLoss, LlipLoss, LossOutput, SigLIPLoss
from lightning_vlm.models import ContrastiveOutput, Llip
from lightning_vlm.models.contrastive import HardNegatives

WORLD, GLOBAL_BATCH, VOCAB, NEGATIVES = 2, 8, 40, 2
CASES = ["clip", "siglip", "llip", "clip+negatives", "siglip+negatives", "llip+negatives"]


class TinyTowers(nn.Module):
    """Two linear towers, a learnable scale and (SigLIP) bias: the smallest model feeding the contrastive losses.

    No bias for CLIP: DDP never reduces a bucket holding a parameter that gets no gradient.
    """

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, images: Tensor, texts: Tensor, negatives: Tensor | None = None, valid: Tensor | None = None,
                text_keys: Tensor | None = None, negative_keys: Tensor | None = None) -> ContrastiveOutput:
        image_emb, text_emb = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        negative_emb = None if negatives is None else F.normalize(self.text(negatives), dim=-1)
        return ContrastiveOutput(image_emb, text_emb, self.logit_scale, self.logit_bias, negative_emb, valid,
                                 text_keys, negative_keys)


class LlipWithNegatives(nn.Module):
    """Llip taking its hard negatives as loose tensors, so every input can be split across ranks alike."""

    def __init__(self, model: Llip) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor, ids: Tensor, mask: Tensor, *negatives: Tensor):
        return self.model(pixels, ids, mask, HardNegatives(*negatives) if negatives else None)


def _tokens(n: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, VOCAB, (n, 6))
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    return ids, mask


def _copy_captions(captions: Tensor, negatives: Tensor) -> None:
    """Captions 1 (rank 0) and 6 (rank 1) one text, and rank 1's negative 12 spelling caption 2 (rank 0): copies of a
    caption are no negatives of it, which takes keys gathered across ranks."""
    captions[6], negatives[12] = captions[1], captions[2]


def _case(name: str) -> tuple[nn.Module, nn.Module, tuple[Tensor, ...]]:
    """The same seeded model, loss and global batch in every process; "+negatives" adds NEGATIVES hard-negative
    captions per pair, one padded slot among them (valid False), and copies of captions across ranks."""
    torch.manual_seed(0)
    paradigm, negatives = name.split("+")[0], name.endswith("+negatives")
    valid = torch.ones(GLOBAL_BATCH * NEGATIVES, dtype=torch.bool)
    valid[3] = False
    if paradigm == "llip":
        vision = VisionEncoder("vit_tiny_patch16_224", num_extra_tokens=3,
                               overrides=dict(img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2))
        model = Llip(vision, TextEncoder(vocab_size=VOCAB, config={"num_hidden_layers": 1}), embed_dim=16)
        inputs = (torch.randn(GLOBAL_BATCH, 3, 16, 16), *_tokens(GLOBAL_BATCH))
        extra = (*_tokens(GLOBAL_BATCH * NEGATIVES), valid) if negatives else ()
        if negatives:
            for captions, copies in zip(inputs[1:], extra[:2]):  # ids and mask alike
                _copy_captions(captions, copies)
        return LlipWithNegatives(model).eval(), LlipLoss(), inputs + extra  # eval: no dropout
    loss = CLIPLoss() if paradigm == "clip" else SigLIPLoss()
    inputs = (torch.randn(GLOBAL_BATCH, 6), torch.randn(GLOBAL_BATCH, 5))
    extra = ()
    if negatives:
        texts, keys = torch.randn(GLOBAL_BATCH * NEGATIVES, 5), torch.arange(GLOBAL_BATCH * (1 + NEGATIVES))
        _copy_captions(inputs[1], texts)
        _copy_captions(keys[:GLOBAL_BATCH], keys[GLOBAL_BATCH:])
        extra = (texts, valid, keys[:GLOBAL_BATCH], keys[GLOBAL_BATCH:])
    return TinyTowers(bias=paradigm == "siglip"), loss, inputs + extra


def _loss_and_grads(model: nn.Module, loss_fn: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    out: LossOutput = loss_fn(model(*inputs))
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.total.detach(), **grads}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for name in CASES:
        model, loss_fn, inputs = _case(name)
        local = tuple(x.chunk(WORLD)[rank] for x in inputs)  # pairs and their negatives, split alike
        ddp = DistributedDataParallel(model)
        results[name] = {k.removeprefix("module."): v for k, v in _loss_and_grads(ddp, loss_fn, local).items()}
    results["gathered"] = gather_objects({"rank": rank})  # what the eval suites gather their samples with
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, dict[str, Tensor]]]:
    """Run every case once in 2 spawned gloo processes (one spawn for all cases keeps the suite fast)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_match_one_process(name: str, rank_results) -> None:
    model, loss_fn, inputs = _case(name)
    single = _loss_and_grads(model, loss_fn, inputs)
    per_rank = [r[name] for r in rank_results]
    # global loss = mean of the per-rank losses (each is its local rows' share of the global average)
    mean_loss = sum(r["loss"] for r in per_rank) / WORLD
    assert torch.allclose(mean_loss, single["loss"], atol=1e-5)
    assert set(per_rank[0]) == set(single) and len(single) > 2
    for key in single.keys() - {"loss"}:
        # DDP-averaged gradients are identical on every rank and equal the one-process gradient
        assert torch.allclose(per_rank[0][key], per_rank[1][key], atol=1e-6), key
        assert torch.allclose(per_rank[0][key], single[key], atol=1e-5, rtol=1e-4), key


def test_eval_gather_collects_every_rank_in_order(rank_results) -> None:
    assert [r["gathered"] for r in rank_results] == [[{"rank": 0}, {"rank": 1}]] * WORLD
    assert gather_objects("alone") is None  # one process: nothing to gather
