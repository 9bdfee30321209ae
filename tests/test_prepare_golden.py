"""What preparation keeps out of training: a golden set's examples (and their near copies), and examples an
earlier job trained on (the persistent dedup index, through a real S3 protocol server and a local folder)."""

import json
import random

import orjson
import pytest

from conftest import job_doc
from kubetune.data.prepare import PrepareError, prepare
from kubetune.data.reference import IndexUnusable
from kubetune.spec import parse_job

def _chat(i: int, tweak: str = "") -> dict:
    """A conversation of about 40 distinct words, so one changed word leaves it a near duplicate (Jaccard ~0.9)."""
    rng = random.Random(i)
    reply = " ".join(f"{rng.choice(['open', 'set', 'check', 'save'])}{rng.randrange(10**6)}" for _ in range(40))
    return {"messages": [{"role": "user", "content": f"How do I configure feature {i} of the product?"},
                         {"role": "assistant", "content": reply + tweak}]}


def _near(record: dict) -> dict:
    """The same conversation with its last word changed and different spacing."""
    reply = record["messages"][1]["content"].rsplit(" ", 1)[0] + " zulu99"
    return {"messages": [record["messages"][0], {"role": "assistant", "content": reply.replace(" ", "  ", 3)}]}


def _write(path, records):
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return str(path)


def _texts(out, split: str) -> set[str]:
    lines = (out / "prepared" / f"{split}.jsonl").read_text().splitlines()
    return {json.loads(line)["messages"][-1]["content"] for line in lines}


def _quiet(_):
    pass


@pytest.mark.parametrize("seed", [42, 7])  # the default seed shares its MinHash signatures with near dedup
def test_golden_examples_and_their_near_copies_are_never_trained_on(tmp_path, seed):
    golden = [_chat(1000 + i) for i in range(4)]
    train = [_chat(i) for i in range(60)] + [golden[0], _near(golden[1]), _near(golden[2])]
    out = tmp_path / "out"
    job = parse_job(job_doc(_write(tmp_path / "train.jsonl", train), str(out), training={"seed": seed},
                            evaluation={"goldenSet": _write(tmp_path / "golden.jsonl", golden)}))
    report = prepare(job, log=_quiet)

    assert report["duplicates"]["golden"] == 3 and report["dropped"]["golden_duplicate"] == 3
    assert report["examples_out"]["golden"] == 4
    assert report["examples_out"]["train"] + report["examples_out"]["validation"] == 60
    held = {g["messages"][1]["content"] for g in golden}
    assert _texts(out, "golden") == held
    seen = _texts(out, "train") | _texts(out, "validation")
    assert not any(w[:60] in s for w in held for s in seen)  # no copy, not even a near one
    meta = json.loads((out / "prepared/meta.json").read_text())
    assert meta["golden"]["rows"] >= 1 and meta["golden"]["files"]


def test_dedup_index_carries_what_one_job_trained_on_to_the_next(s3, s3_server, tmp_path):
    client, bucket = s3
    first, fresh = [_chat(i) for i in range(50)], [_chat(100 + i) for i in range(30)]
    client.put_object(Bucket=bucket, Key="a/d.jsonl", Body=open(_write(tmp_path / "a.jsonl", first), "rb").read())
    again = first + [_near(first[0])] + fresh
    client.put_object(Bucket=bucket, Key="b/d.jsonl", Body=open(_write(tmp_path / "b.jsonl", again), "rb").read())
    index = f"s3://{bucket}/sched/dedup-index/"

    def run(name: str):
        doc = job_doc(f"s3://{bucket}/{name[0]}/", str(tmp_path / name), storage={"endpoint": s3_server},
                      preprocessing={"dedup": {"index": index}})
        return prepare(parse_job(doc), log=_quiet)

    a = run("a")
    trained_a = _texts(tmp_path / "a", "train")
    assert a["dedup_index"] == {"uri": index, "examples_before": 0, "added": len(trained_a)}
    b = run("b")
    # every example A trained on is dropped (and the near copy of one, unless it was A's validation), nothing new is
    assert b["duplicates"]["index"] in (len(trained_a), len(trained_a) + 1)
    assert not (_texts(tmp_path / "b", "train") | _texts(tmp_path / "b", "validation")) & trained_a
    assert b["examples_out"]["train"] + b["examples_out"]["validation"] >= 30
    assert b["dedup_index"]["examples_before"] == len(trained_a)
    # a retried prepare of B starts from the index as it was before B: it does not drop B's own examples
    assert run("b")["duplicates"]["index"] == b["duplicates"]["index"]
    pointer = json.loads(client.get_object(Bucket=bucket, Key="sched/dedup-index/current.json")["Body"].read())
    assert pointer["examples"] == len(trained_a) + b["dedup_index"]["added"]
    names = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="sched/dedup-index/")["Contents"]}
    assert len(names) <= 3  # the pointer, the current generation and its parent: old ones are deleted


def test_an_interrupted_index_update_leaves_the_old_index_readable(tmp_path):
    index = tmp_path / "index"
    first, second = [_chat(i) for i in range(40)], [_chat(200 + i) for i in range(40)]

    def run(name: str, records):
        doc = job_doc(_write(tmp_path / f"{name}.jsonl", records), str(tmp_path / name),
                      preprocessing={"dedup": {"index": str(index)}})
        return prepare(parse_job(doc), log=_quiet)

    run("a", first)
    before = (index / "current.json").read_bytes()
    (index / "current.json.tmp").mkdir()  # the pointer's replacement cannot be written: a crash at that step
    with pytest.raises(OSError):
        run("b", second)
    assert (index / "current.json").read_bytes() == before  # still the old generation, which is whole
    (index / "current.json.tmp").rmdir()
    c = run("c", first + second)  # the old index still works: what A trained on is dropped
    assert c["dedup_index"]["examples_before"] == len(_texts(tmp_path / "a", "train"))
    assert c["duplicates"]["index"] == len(_texts(tmp_path / "a", "train"))


def test_an_index_made_with_other_dedup_settings_is_refused_naming_the_field(tmp_path):
    index, data = str(tmp_path / "index"), _write(tmp_path / "d.jsonl", [_chat(i) for i in range(30)])
    prepare(parse_job(job_doc(data, str(tmp_path / "a"), preprocessing={"dedup": {"index": index}})), log=_quiet)
    other = job_doc(data, str(tmp_path / "b"), preprocessing={"dedup": {"index": index, "ngram": 5}})
    with pytest.raises(IndexUnusable, match="preprocessing.dedup.index"):
        prepare(parse_job(other), log=_quiet)


def test_a_golden_set_with_nothing_usable_fails_naming_the_field(tmp_path):
    data = _write(tmp_path / "d.jsonl", [_chat(i) for i in range(20)])
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "README.md").write_text("not data")
    for golden, says in ((str(tmp_path / "none"), "evaluation.goldenSet: .* no data files"),
                         (_write(tmp_path / "g.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "ok"}]}]),
                          "evaluation.goldenSet: no examples left after cleaning")):
        job = parse_job(job_doc(data, str(tmp_path / "out"), evaluation={"goldenSet": golden}))
        with pytest.raises(PrepareError, match=says):
            prepare(job, log=_quiet)
