"""Base-model loading: the real from_pretrained path on folders saved with save_pretrained, local and s3://."""

import pytest
import torch

from conftest import job_doc
from kubetune.data.prepare import prepare
from kubetune.models import ModelError, config_for, load_model, load_tokenizer, resolve_source, train_tokenizer
from kubetune.spec import FromConfig, parse_job
from kubetune.storage import upload_tree


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama and its tokenizer saved the way a Hugging Face model folder looks."""
    folder = tmp_path_factory.mktemp("base-model")
    tok = train_tokenizer([f"hello world number {i}, how can I help?" for i in range(100)], vocab_size=300)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config_for(FromConfig(size="tiny"), tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_local_folder_loads_and_generates(saved_model, tmp_path):
    folder, original = saved_model
    job = parse_job(job_doc("d", "o", model={"source": str(folder)}))
    tok = load_tokenizer(job)
    model = load_model(job, tok)
    assert _same_weights(model, original)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_s3_model_is_downloaded_then_loaded(saved_model, s3, s3_server, tmp_path):
    folder, original = saved_model
    _, bucket = s3
    upload_tree(folder, f"s3://{bucket}/models/base/", parse_job(job_doc("d", "o")).spec.storage.model_copy(update={"endpoint": s3_server}))
    job = parse_job(job_doc("d", "o", model={"source": f"s3://{bucket}/models/base/"}, storage={"endpoint": s3_server}))
    local = resolve_source(job, cache_dir=tmp_path / "cache")
    model = load_model(job, load_tokenizer(job, cache_dir=tmp_path / "cache"), source=local)
    assert _same_weights(model, original)


def test_prepare_uses_the_base_models_tokenizer(saved_model, tmp_path):
    folder, _ = saved_model
    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        f'{{"prompt": "hello {i}?", "completion": "world number {i}, how can I help?"}}\n' for i in range(20)))
    job = parse_job(job_doc(str(data), str(tmp_path / "o"), model={"source": str(folder)},
                            preprocessing={"dedup": {"near": False}}))
    prepare(job, log=lambda _: None)
    assert (tmp_path / "o/tokenizer/tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def test_missing_source_and_from_job_say_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="is not a folder"):
        resolve_source(parse_job(job_doc("d", "o", model={"source": str(tmp_path / "none")})))
    with pytest.raises(ModelError, match="resolved by the operator"):
        resolve_source(parse_job(job_doc("d", "o", model={"fromJob": "previous"})))


def test_lora_adapters_take_the_training_dtype(saved_model):
    """In bf16 the adapters are bf16 from the start, as DeepSpeed leaves them: blocks compiled before its cast
    would otherwise keep peft's fp32 input casts and fail on a GPU (mat1 float, mat2 bf16)."""
    from kubetune.models import build_model

    folder, _ = saved_model
    job = parse_job(job_doc("d", "o", model={"source": str(folder)}, training={"method": "lora"}))
    model = build_model(job, load_tokenizer(job), str(folder), torch.bfloat16)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
