"""text_similarity's metrics, each a score in [0, 1] of a text against a reference.

fuzzy_match: difflib's ratio (2 * matching characters / total; rapidfuzz is not a dependency, and its
ratio differs slightly). bleu: sacrebleu's sentence BLEU / 100. gleu: sentence GLEU (Wu et al. 2016, as
NLTK's sentence_gleu) over whitespace tokens, 1- to 4-grams. rouge_1..5, rouge_l: rouge-score's F-measure
(its default tokenizer, no stemming). sacrebleu and rouge-score come with kubetune[serve]; without them
those metrics raise GraderUnavailable.
"""

from __future__ import annotations

import difflib
from collections import Counter

from kubetune.graders.errors import GraderUnavailable


def score(metric: str, text: str, reference: str) -> float:
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
    if metric == "bleu":
        return _bleu(text, reference)
    if metric == "gleu":
        return gleu(text.split(), reference.split())
    return _rouge(metric, text, reference)


def gleu(hypothesis: list[str], reference: list[str], min_n: int = 1, max_n: int = 4) -> float:
    """min(precision, recall) of all n-grams (min_n..max_n) taken together."""
    hyp, ref = _ngrams(hypothesis, min_n, max_n), _ngrams(reference, min_n, max_n)
    matches = sum((hyp & ref).values())
    predicted, wanted = sum(hyp.values()), sum(ref.values())
    if not predicted or not wanted:
        return 0.0
    return min(matches / predicted, matches / wanted)


def _ngrams(tokens: list[str], min_n: int, max_n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(min_n, max_n + 1) for i in range(len(tokens) - n + 1))


def _bleu(text: str, reference: str) -> float:
    try:
        import sacrebleu
    except ModuleNotFoundError:
        raise _missing("bleu", "sacrebleu") from None
    return sacrebleu.sentence_bleu(text, [reference]).score / 100


def _rouge(metric: str, text: str, reference: str) -> float:
    try:
        from rouge_score import rouge_scorer
    except ModuleNotFoundError:
        raise _missing(metric, "rouge-score") from None
    key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
    return rouge_scorer.RougeScorer([key]).score(reference, text)[key].fmeasure


def _missing(metric: str, package: str) -> GraderUnavailable:
    return GraderUnavailable(f"evaluation_metric {metric!r} needs {package}, which is not installed here: "
                             "pip install 'kubetune[serve]'", "grader.evaluation_metric")
