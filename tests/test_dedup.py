import random

import numpy as np

from kubetune.data.dedup import NearDedup, jaccard, lsh_params

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
