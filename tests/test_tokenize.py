import pytest

from kubetune.data.tokenize import IGNORE, pack, packed_rows, tokenize_batch
from kubetune.models import train_tokenizer

LLAMA3_LIKE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONV = [
    {"role": "system", "content": "Be brief.", "weight": 0},
    {"role": "user", "content": "How do I export?", "weight": 0},
    {"role": "assistant", "content": "Old answer.", "weight": 0},
    {"role": "user", "content": "And now?", "weight": 0},
    {"role": "assistant", "content": "Use Settings > Export.", "weight": 1},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"user: question {i} about export and settings. assistant: answer {i} use Settings > Export." for i in range(200)]
    return train_tokenizer(texts, vocab_size=400)


def _trained_text(tok, t):
    return tok.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE])


def test_only_weighted_assistant_turns_are_labeled(tokenizer):
    [t] = tokenize_batch(tokenizer, [CONV])
    assert _trained_text(tokenizer, t) == "Use Settings > Export.<|im_end|>\n"
    assert "Old answer." in tokenizer.decode(t.input_ids)


def test_another_template_works_the_same(tokenizer):
    tokenizer.chat_template = LLAMA3_LIKE
    try:
        [t] = tokenize_batch(tokenizer, [CONV])
        assert _trained_text(tokenizer, t) == "Use Settings > Export.<|eot_id|>"
    finally:
        from kubetune.models import CHATML_TEMPLATE
        tokenizer.chat_template = CHATML_TEMPLATE


def test_plain_text_is_trained_whole(tokenizer):
    [t] = tokenize_batch(tokenizer, [[{"role": "assistant", "content": "Just text.", "weight": 1}]])
    assert _trained_text(tokenizer, t) == "Just text.<|im_end|>\n"


def test_best_fit_packing_respects_capacity():
    lengths = [90, 60, 50, 40, 30, 20, 10, 100]
    bins = pack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4  # 400 tokens in 4 full rows


def test_packed_rows_keep_document_boundaries(tokenizer):
    examples = tokenize_batch(tokenizer, [CONV, CONV[:3] + [{**CONV[2], "weight": 1}]])
    [row] = packed_rows(examples, capacity=512, packing=True)
    assert sum(row["doc_lens"]) == len(row["input_ids"]) == len(row["labels"])
    starts = [0, row["doc_lens"][0]] if row["doc_lens"] else []
    assert all(row["labels"][s] == IGNORE for s in starts)  # no loss across a boundary
    unpacked = packed_rows(examples, capacity=512, packing=False)
    assert [r["doc_lens"] for r in unpacked] == [[len(e.input_ids)] for e in examples]
