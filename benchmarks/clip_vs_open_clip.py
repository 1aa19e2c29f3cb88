"""Training samples/s of our CLIP (DualEncoder: timm ViT + BERT, CLIPLoss) next to open_clip's CLIP (its own ViT and
text transformer, ClipLoss) at the same tiny sizes, on the same batch, timed in alternation within one run.

    python benchmarks/clip_vs_open_clip.py [--batch-size 128] [--steps 20] [--rounds 3] [--device cpu|cuda]
                                           [--precision fp32|bf16] [--threads N]

On a CPU shared with other jobs, --threads 1 avoids the stalls of OpenMP threads waiting for a descheduled peer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
from torch import Tensor, nn

from lightning_vlm.encoders import TextEncoder, VisionEncoder
from lightning_vlm.losses.contrastive import CLIPLoss
from lightning_vlm.models.contrastive import DualEncoder

# One tiny configuration; both sides are derived from it.
IMAGE_SIZE, PATCH_SIZE = 64, 8
WIDTH, DEPTH, HEADS, MLP_RATIO = 128, 4, 4, 4  # shared by both towers of both models
CONTEXT, VOCAB, EMBED_DIM = 32, 1000, 64

Batch = tuple[Tensor, Tensor, Tensor]  # pixel_values (B, 3, H, W), input_ids (B, L), attention_mask (B, L)
StepLoss = Callable[[Batch], Tensor]


def build_ours() -> tuple[nn.Module, StepLoss]:
    """timm ViT (class-token pooled) + BERT encoder ([CLS] pooled), bias-free projections, CLIPLoss.

    BERT's dropout is set to 0 because open_clip's towers have none (BERT's default is 0.1).
    """
    vision = VisionEncoder("vit_tiny_patch16_224", overrides={
        "img_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS,
        "mlp_ratio": MLP_RATIO})
    text = TextEncoder(vocab_size=VOCAB, config={
        "hidden_size": WIDTH, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS,
        "intermediate_size": MLP_RATIO * WIDTH, "max_position_embeddings": CONTEXT,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model, loss = DualEncoder(vision, text, embed_dim=EMBED_DIM), CLIPLoss()
    return model, lambda batch: loss(model(*batch)).total


def build_open_clip() -> tuple[nn.Module, StepLoss]:
    """open_clip's own ViT (class-token pooled) and causal text transformer (argmax-token pooled), ClipLoss.

    open_clip's timm adapter (TimmModel) passes no img_size/patch_size/depth to timm, so the tiny timm ViT cannot
    be built there; its own VisionTransformer at the same sizes is used. Both text towers see the same token ids.
    """
    model = open_clip.CLIP(
        EMBED_DIM,
        vision_cfg={"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "width": WIDTH, "layers": DEPTH,
                    "head_width": WIDTH // HEADS, "mlp_ratio": MLP_RATIO},
        text_cfg={"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "layers": DEPTH, "heads": HEADS,
                  "mlp_ratio": MLP_RATIO})
    loss = open_clip.ClipLoss()
    return model, lambda batch: loss(*model(batch[0], batch[1]))


def count(model: nn.Module, *prefixes: str) -> int:
    """Parameters whose name starts with one of the prefixes (all of them without prefixes)."""
    return sum(p.numel() for n, p in model.named_parameters() if not prefixes or n.startswith(prefixes))


def parameter_table(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, int, int]]:
    """(part, ours, open_clip) parameter counts.

    Differences are a few hundred parameters, all norms and biases: vision: timm's patch embedding has a bias and no
    pre-LayerNorm, open_clip's conv1 has no bias and ln_pre; text: BERT has token-type embeddings and an embedding
    LayerNorm (post-LN blocks), open_clip a final ln_final (pre-LN blocks). Projections and logit scale match.
    """
    text_prefixes = ("transformer.", "token_embedding", "positional_embedding", "ln_final")
    return [
        ("vision tower", count(ours, "vision."), count(theirs, "visual.") - theirs.visual.proj.numel()),
        ("text tower", count(ours, "text."), count(theirs, *text_prefixes)),
        ("projections + scale", count(ours, "heads."),
         theirs.visual.proj.numel() + count(theirs, "text_projection", "logit_scale")),
        ("total", count(ours), count(theirs)),
    ]


def timed_step(step_loss: StepLoss, optimizer: torch.optim.Optimizer, batch: Batch,
               precision: contextlib.AbstractContextManager, device: torch.device) -> float:
    """Seconds of one training step (forward, backward, optimizer step)."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with precision:
        loss = step_loss(batch)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                 else contextlib.nullcontext())

    torch.manual_seed(0)
    contenders = {"ours": build_ours(), "open_clip": build_open_clip()}
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
             torch.randint(1, VOCAB, (args.batch_size, CONTEXT), generator=generator),
             torch.ones(args.batch_size, CONTEXT, dtype=torch.long))
    batch = tuple(t.to(device) for t in batch)

    print(f"{'parameters':<22}{'ours':>12}{'open_clip':>12}")
    for part, n_ours, n_theirs in parameter_table(contenders["ours"][0], contenders["open_clip"][0]):
        print(f"{part:<22}{n_ours:>12,}{n_theirs:>12,}")

    runs = {}
    for name, (model, step_loss) in contenders.items():
        model.to(device).train()
        runs[name] = (step_loss, torch.optim.AdamW(model.parameters(), lr=1e-3), [])
        for _ in range(args.warmup):
            timed_step(*runs[name][:2], batch, precision, device)
    # Step by step in alternation, the first model flipping each round: load from other processes and drift hit
    # both alike (with blocks of steps, a burst of load can fall on one model only).
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for _ in range(args.steps):
            for name in order:
                step_loss, optimizer, times = runs[name]
                times.append(timed_step(step_loss, optimizer, batch, precision, device))

    print(f"\nbatch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, device {device}, "
          f"{args.precision}, {torch.get_num_threads()} threads")
    print(f"{'model':<12}{'median ms/step':>16}{'p25-p75 ms':>16}{'min ms':>10}{'samples/s':>12}")
    rate = {}
    for name, (_, _, times) in runs.items():
        q1, median, q3 = statistics.quantiles(times, n=4)
        rate[name] = args.batch_size / median
        print(f"{name:<12}{1e3 * median:>16.1f}{f'{1e3 * q1:.0f}-{1e3 * q3:.0f}':>16}{1e3 * min(times):>10.1f}"
              f"{rate[name]:>12.0f}")
    print(f"ratio ours/open_clip samples/s: {rate['ours'] / rate['open_clip']:.2f}")


if __name__ == "__main__":
    main()
