import json
import random

import numpy as np
import orjson
import pytest

from conftest import job_doc
from kubetune.data.dedup import NearDedup, exact_key, jaccard, lsh_params
from kubetune.data.prepare import prepare
from kubetune.spec import parse_job

WORDS = [f"w{i}" for i in range(5000)]


def _doc(rng, n=80):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _edit(rng, text, changes):
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words)


def test_near_duplicates_found_and_distinct_texts_kept():
    rng = random.Random(0)
    originals = [_doc(rng) for _ in range(300)]
    near = [_edit(rng, originals[i], 2) for i in range(0, 300, 3)]
    texts = originals + near
    found = NearDedup(threshold=0.8, ngram=3).find(texts)
    assert all(j is None for j in found[:300]), "distinct random documents must all be kept"
    recall = sum(found[300 + k] == 3 * k for k in range(len(near))) / len(near)
    assert recall >= 0.95, recall


def test_threshold_is_exact_jaccard():
    d = NearDedup(threshold=0.8, ngram=1)
    a = " ".join(f"t{i}" for i in range(100))
    similar = " ".join(f"t{i}" for i in range(10, 100)) + " x1 x2"   # J = 90/102 = 0.88
    different = " ".join(f"t{i}" for i in range(30, 100)) + " y1 y2"  # J = 70/102 = 0.69
    assert jaccard(d.shingles(a), d.shingles(similar)) > 0.8 > jaccard(d.shingles(a), d.shingles(different))
    assert d.find([a, similar, different]) == [None, 0, None]


def test_signatures_estimate_jaccard():
    d = NearDedup(threshold=0.5, ngram=1, num_perm=256)
    a = " ".join(f"t{i}" for i in range(200))
    b = " ".join(f"t{i}" for i in range(100, 300))  # J = 100/300
    sa, sb = d.signatures([d.shingles(a), d.shingles(b)])
    assert abs(np.mean(sa == sb) - 1 / 3) < 0.08


def test_lsh_params_fill_num_perm_and_favour_recall():
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128
    p_at_threshold = 1 - (1 - 0.8**rows) ** bands
    assert p_at_threshold >= 0.98


def test_exact_key_ignores_runs_of_whitespace():
    base = "user: How do I reset my password?\nassistant: Open Settings, then Security."
    for copy in (base.replace(" ", "  "), "  " + base + " \n", base.replace("\n", " "), base.replace(" ", "\t"),
                 base.replace(", ", ",\n\t ")):
        assert exact_key(copy) == exact_key(base), repr(copy)
    assert exact_key(base.replace("Security", "Privacy")) != exact_key(base)
    assert exact_key("reset password") != exact_key("resetpassword")  # a run counts as one space, not none


@pytest.mark.parametrize("near", [True, False])
def test_spacing_only_copies_are_exact_duplicates_in_the_report(tmp_path, near):
    def chat(question, reply):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}

    originals = [chat(f"How do I export report {i}?", f"Open the  Reports tab,\tpick report {i} and choose Export as CSV.")
                 for i in range(20)]
    copies = []
    for i, o in enumerate(originals):
        question, reply = (m["content"] for m in o["messages"])
        spaced = [reply.replace("  ", " ").replace("\t", " "), reply.replace(" ", "   "), reply.replace(", ", ",\n"),
                  reply.replace(" ", "\t")][i % 4]
        copies.append(chat(" " + question.replace(" ", "  ") + "\t", spaced))
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in originals + copies))
    job = parse_job(job_doc(str(data), str(tmp_path / "out"), preprocessing={"maxSeqLength": 256, "dedup": {"near": near}}))
    report = prepare(job, log=lambda _: None)
    assert report["duplicates"] == {"exact": 20, "near": 0}
    kept = [json.loads(line)["messages"][1]["content"] for split in ("train", "validation")
            for line in (tmp_path / f"out/prepared/{split}.jsonl").read_text().splitlines()]
    assert sorted(kept) == sorted(m["messages"][1]["content"] for m in originals)  # the text keeps its spacing
