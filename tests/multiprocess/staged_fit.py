"""One rank of a two-process CPU (gloo) fit whose staged plan changes what trains mid-run; launched by
tests/test_ddp.py with torch.distributed.run. Each rank saves every parameter at the end to OUT/rank{R}.pt.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/multiprocess/staged_fit.py CASE ROOT OUT

CASE "blip2": a tiny BLIP-2 through stage 1 (Q-Former) into stage 2 (LM and projection unfrozen);
CASE "llava_lora": a tiny LLaVA whose LM gains LoRA adapters in its second phase.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from lightning_vlm.adapters import MLP, QFormer  # noqa: E402
from lightning_vlm.callbacks import StagedFreezing  # noqa: E402
from lightning_vlm.data import ShardDataModule  # noqa: E402
from lightning_vlm.encoders import LanguageModel, VisionEncoder  # noqa: E402
from lightning_vlm.losses import BLIP2Loss  # noqa: E402
from lightning_vlm.models import BLIP2, LLaVA  # noqa: E402
from lightning_vlm.paradigms import BLIP2Paradigm, ImageToText  # noqa: E402

TINY_VIT = {"img_size": 64, "patch_size": 16, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}
STAGE_TWO = 3


def blip2(root: str) -> tuple[L.LightningModule, list[dict], dict]:
    model = BLIP2(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  lambda width: QFormer(width, config=TINY_BERT, tokenizer=root, num_queries=4),
                  LanguageModel(tokenizer=root, config=TINY_LM), embed_dim=16, projection=MLP())
    phases = [{"start_step": 0, "freeze": ["vision", "language_model", "lm_projection"],
               "loss_weights": {"itc": 1.0, "itm": 1.0, "itg": 1.0, "lm": 0.0}},
              {"start_step": STAGE_TWO, "unfreeze": ["language_model", "lm_projection"],
               "loss_weights": {"itc": 0.0, "itm": 0.0, "itg": 0.0, "lm": 1.0}}]
    return BLIP2Paradigm(model, BLIP2Loss(), lr=1e-2, warmup_steps=1), phases, {"caption": 1.0, "vqa": 1.0}


def llava_lora(root: str) -> tuple[L.LightningModule, list[dict], dict]:
    model = LLaVA(VisionEncoder("vit_tiny_patch16_224", overrides=TINY_VIT),
                  LanguageModel(tokenizer=root, config=TINY_LM), MLP())
    phases = [{"start_step": 0, "freeze": ["vision", "language_model"]},
              {"start_step": STAGE_TWO, "lora": {"language_model": {"r": 4, "lora_alpha": 8}}}]
    return ImageToText(model, lr=1e-2, warmup_steps=1), phases, {"caption": 1.0, "vqa": 1.0}


def main(case: str, root: str, out: str) -> None:
    torch.manual_seed(0)  # the same initial replica on every rank (DDP also broadcasts rank 0's)
    paradigm, phases, tasks = {"blip2": blip2, "llava_lora": llava_lora}[case](root)
    data = ShardDataModule(root=root, tasks=tasks, batch_size=4, num_workers=0)
    strategy = "ddp_find_unused_parameters_true" if case == "blip2" else "ddp"  # stage 2 leaves the ITC/ITM heads idle
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2 * STAGE_TWO,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StagedFreezing(phases)], default_root_dir=out)
    trainer.fit(paradigm, data)
    state = {name: param.detach().clone() for name, param in paradigm.named_parameters()}
    torch.save({"state": state, "steps": trainer.global_step,
                "trained": sorted(name for name, param in paradigm.named_parameters() if param.requires_grad)},
               Path(out) / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
