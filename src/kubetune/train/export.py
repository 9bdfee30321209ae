"""A Hugging Face model (safetensors) with its tokenizer and chat template: the final ``OUTPUT/model/``
and each checkpoint's ``step-N/model/`` are written by the same function.

Weights are gathered on rank 0 (ZeRO-3 partitions are consolidated first) and loaded into a fresh
CPU copy of the same architecture, which is what gets saved. For LoRA the adapter is saved as is
(``adapter/``) and merged into the base for ``model/``, so ``from_pretrained`` needs nothing else.
"""

from __future__ import annotations

import shutil
from hashlib import blake2b
from pathlib import Path

import torch
import torch.distributed as dist

from kubetune.models import build_model
from kubetune.spec import FineTuneJob
from kubetune.storage import Mirror


def export_model(engine, job: FineTuneJob, tokenizer, source: str | None, dtype: torch.dtype, scratch: Path,
                 dest: str) -> None:
    """Every rank: write ``dest``/model (and ``dest``/adapter for LoRA), local or s3://."""
    if job.spec.training.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state = engine.module.state_dict() if dist.get_rank() == 0 else None
    if dist.get_rank() == 0:
        # a scratch folder of its own per destination: publish() uploads all that is in it
        out = Mirror(dest, scratch / "export" / blake2b(dest.encode(), digest_size=6).hexdigest(), job.spec.storage)
        folder = out.path
        fresh = build_model(job, tokenizer, source, dtype)
        missing, unexpected = fresh.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
        tied = {k for k in missing if "lm_head" in k or "embed_tokens" in k}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"exported weights do not match the model: missing {missing}, unexpected {unexpected}")
        if job.spec.training.method == "lora":
            fresh.save_pretrained(folder / "adapter")
            tokenizer.save_pretrained(folder / "adapter")
            fresh = fresh.merge_and_unload()
        fresh.set_attn_implementation("sdpa")  # the packed-row attention is for training only
        fresh.config.use_cache = True
        fresh.save_pretrained(folder / "model", safe_serialization=True)
        tokenizer.save_pretrained(folder / "model")
        out.publish()
        if out.remote:
            shutil.rmtree(folder, ignore_errors=True)  # uploaded; scratch is not a second store
    dist.barrier()
