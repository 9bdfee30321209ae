import pytest

from kubetune.data.tokenize import IGNORE, pack, tokenize_batch
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


def test_packed_rows_keep_document_boundaries(tokenizer, tmp_path):
    import orjson
    import pyarrow.parquet as pq

    from kubetune.data.shards import ShardWriter, Tokenizing

    lines = [orjson.dumps({"messages": m}) for m in (CONV, CONV[:3] + [{**CONV[2], "weight": 1}])]
    chunk = Tokenizing(tokenizer, max_len=512, pairs=False)(lines)
    for packing, folder in ((True, tmp_path / "packed"), (False, tmp_path / "unpacked")):
        folder.mkdir()
        writer = ShardWriter(folder, "train", 512, packing, pairs=False)
        writer.add(chunk)
        assert writer.close()["rows"] == (1 if packing else 2)
        rows = pq.read_table(folder / "train-00000.parquet").to_pylist()
        for row in rows:
            assert sum(row["doc_lens"]) == len(row["input_ids"]) == len(row["labels"])
            starts = [sum(row["doc_lens"][:k]) for k in range(len(row["doc_lens"]))]
            assert all(row["labels"][s] == IGNORE for s in starts)  # no loss across a boundary
    assert sorted(len(r["input_ids"]) for r in rows) == sorted(chunk.doc_lens.tolist())


def test_one_rendering_and_the_prefix_method_give_the_same_labels(tokenizer):
    """The fromConfig template marks assistant output with {% generation %}: its labels come from one
    rendering, and equal those of rendering every prefix (the method for templates without the marks)."""
    import json

    from conftest import EXAMPLES
    from kubetune.data.formats import standardize, tools_of
    from kubetune.data.tokenize import Renderer

    records = [json.loads(line) for name in ("data/support-chat.jsonl", "tool-calls.jsonl")
               for line in (EXAMPLES / name).read_text().splitlines() if line.strip()]
    conversations = [standardize(r) for r in records] + [CONV, [{"role": "assistant", "content": "Just text.", "weight": 1}]]
    tools = [tools_of(r) for r in records] + [None, None]
    assert Renderer(tokenizer).render(CONV, spans=True)[1] is not None  # the one-rendering path is taken
    one = tokenize_batch(tokenizer, conversations, tools)
    assert all(t is not None for t in one)
    assert one == tokenize_batch(tokenizer, conversations, tools, one_pass=False)


def _whitespace_word_tokenizer():
    """A tokenizer whose pre-tokenizer drops spaces, so some characters are in no token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["user assistant : Use Settings > Export . How do I export ? 😀 中文 <end>"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "<end>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<end>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' <end>\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    return fast


@pytest.mark.parametrize("kind", ["byte-level BPE", "spaces in no token"])
def test_labels_are_the_tokens_that_start_inside_trained_turns(tokenizer, kind):
    """Whatever the tokenizer: a token is trained exactly when its first character is inside a trained
    assistant turn, also for characters split over several byte tokens and characters in no token."""
    from kubetune.data.tokenize import render_with_spans

    tok = tokenizer if kind == "byte-level BPE" else _whitespace_word_tokenizer()
    conversations = [CONV, [{"role": "user", "content": "How do I export? 😀", "weight": 0},
                            {"role": "assistant", "content": "😀👍🏽 中文 Use Settings > Export.", "weight": 1}]]
    for conversation, t in zip(conversations, tokenize_batch(tok, conversations)):
        text, spans = render_with_spans(tok, conversation)
        enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        expected = [i if any(s <= start < e for s, e in spans) else IGNORE for i, (start, _) in zip(enc.ids, enc.offsets)]
        assert t.input_ids == enc.ids and t.labels == expected
        assert any(label != IGNORE for label in t.labels)
