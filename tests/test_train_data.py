"""Batch planning and packed-batch collation (no processes launched)."""

import numpy as np
import pytest
import torch

from kubetune.models import config_for
from kubetune.packed import attention
from kubetune.packed.rows import IGNORE, Rows, collate
from kubetune.spec import FromConfig
from kubetune.train.plan import PlanError, fingerprint, make_plan, rank_micro_batches, step_rows
from kubetune.train.recipe import warmup_cosine


def test_global_batch_is_the_same_for_any_world_size():
    one, two = (make_plan(100, 8, 4, world, epochs=2, max_steps=None) for world in (1, 2))
    assert (one.micro, one.accum, two.micro, two.accum) == (4, 2, 4, 1)
    assert one.total_steps == two.total_steps == 24
    for step in range(one.total_steps):
        rows = step_rows(one, seed=3, step=step)
        assert np.array_equal(rows, step_rows(two, seed=3, step=step))
        per_rank = [np.concatenate(rank_micro_batches(rows, two, r)) for r in range(2)]
        assert np.array_equal(np.concatenate(per_rank), rows)  # every row once, split across ranks
        assert np.array_equal(np.concatenate(rank_micro_batches(rows, one, 0)), rows)


def test_data_order_depends_on_seed_and_epoch_only():
    plan = make_plan(50, 10, 2, 1, epochs=3, max_steps=None)
    epoch0 = np.concatenate([step_rows(plan, 1, s) for s in range(5)])
    epoch1 = np.concatenate([step_rows(plan, 1, s) for s in range(5, 10)])
    assert sorted(epoch0) == list(range(50)) and not np.array_equal(epoch0, epoch1)
    assert fingerprint(step_rows(plan, 1, 7)) == fingerprint(step_rows(plan, 1, 7)) != fingerprint(step_rows(plan, 2, 7))


def test_plan_errors_name_the_field():
    with pytest.raises(PlanError, match="globalBatchSize 6 is not divisible by the 4"):
        make_plan(100, 6, 1, 4, 1, None)
    with pytest.raises(PlanError, match="3 packed training rows, fewer than training.globalBatchSize 8"):
        make_plan(3, 8, 1, 1, 1, None)
    assert make_plan(100, 12, 5, 2, 1, None).micro == 3  # largest micro batch dividing 6 per rank
    with pytest.raises(PlanError, match="1 packed training row.s., fewer than the 2 training processes"):
        make_plan(1, "auto", 1, 2, 1, None)


@pytest.mark.parametrize("rows, world, batch, steps", [
    (4, 1, 1, 4), (4, 2, 2, 2), (30, 2, 2, 15), (100, 2, 12, 8), (1000, 8, 32, 31), (100, 3, 12, 8), (5, 4, 4, 1)])
def test_auto_batch_fits_small_data_and_caps_at_32(rows, world, batch, steps):
    """30 short conversations pack into a few rows: auto still trains, about 8 steps per epoch where the data
    allows, on every process, and a fixed 32 once the data is large."""
    plan = make_plan(rows, "auto", 4, world, 1, None)
    assert (plan.global_batch, plan.steps_per_epoch) == (batch, steps)
    assert plan.global_batch % world == 0 and plan.global_batch <= rows


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kernel", ["loop", "flex", "mask"])
def test_packed_documents_do_not_see_each_other(kernel, monkeypatch):
    """Logits of a packed row equal those of each document run alone (document-wise attention), with
    either kernel (FlexAttention runs forward only on CPU: its eager reference implementation); "mask" is
    what GPUs get: rows padded to one length and the layout as one BlockMask built from document ids."""
    monkeypatch.setenv("KUBETUNE_ATTENTION", "flex" if kernel == "mask" else kernel)
    from transformers import LlamaForCausalLM

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return 64

    torch.manual_seed(0)
    model = LlamaForCausalLM(config_for(FromConfig(size="tiny"), Tok())).eval()
    model.set_attn_implementation(attention.register())
    a, b = list(range(5, 17)), list(range(20, 29))
    rows = Rows(input_ids=[a + b, a], labels=[a + b, a], doc_lens=[[len(a), len(b)], [len(a)]])
    with torch.no_grad():
        batch = collate(rows, [0, 1], pad_id=0, length=128 if kernel == "mask" else None, doc_mask=kernel == "mask")
        packed = model(**batch.model_inputs()).logits
        alone_a = model(torch.tensor([a])).logits
        alone_b = model(torch.tensor([b])).logits
        mixed = model(torch.tensor([a + b])).logits  # without doc_lens: one causal sequence
    assert torch.allclose(packed[0, : len(a)], alone_a[0], atol=1e-5)
    assert torch.allclose(packed[0, len(a) : len(a + b)], alone_b[0], atol=1e-5)
    assert torch.allclose(packed[1, : len(a)], alone_a[0], atol=1e-5)  # row 1 is padded; pads change nothing
    assert not torch.allclose(mixed[0, len(a) :], alone_b[0], atol=1e-3)  # the check can fail


def test_collation_lists_the_labeled_positions_and_their_documents():
    rows = Rows(input_ids=[[5, 6, 7, 8, 9], [1, 2, 3]], labels=[[IGNORE, 6, IGNORE, 8, 9], [IGNORE, IGNORE, 3]],
                doc_lens=[[2, 3], [3]])
    batch = collate(rows, [0, 1], pad_id=0, length=8, size=3)
    assert batch.inputs["input_ids"].shape == (3, 8)  # one fixed shape: rows and length padded
    # position t is trained when the label at t + 1 is: row 0 predicts 6 at 0, 8 at 2, 9 at 3; row 1 predicts 3 at 1
    assert batch.index.tolist() == [0, 2, 3, 8 + 1] and batch.target.tolist() == [6, 8, 9, 3]
    assert batch.doc.tolist() == [0, 1, 1, 2]  # documents numbered through the batch
    assert batch.labels[0].tolist() == [IGNORE, 6, IGNORE, 8, 9, IGNORE, IGNORE, IGNORE]
    assert batch.inputs["doc_ids"][0].tolist() == [0, 0, 1, 1, 1, -1, -1, -1]
    assert batch.inputs["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, 0, 0]
    assert "doc_lens" not in collate(rows, [0], 0, doc_mask=True).model_inputs()  # the fused kernel's inputs
