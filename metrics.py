"""Scores of answers against reference answers, and their summary: what evaluate_flow.py reports.

Exact match and token F1 after SQuAD's answer normalization; latency percentiles with numpy, the one
definition of a percentile in this project (bench/ uses it too); the side-by-side Markdown table.
"""

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text):
    """SQuAD's answer normalization: lower-case, punctuation deleted, articles dropped, whitespace collapsed."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def token_f1(answer, reference):
    """Harmonic mean of token precision and recall between the normalized answer and reference."""
    answer_tokens, reference_tokens = normalize(answer).split(), normalize(reference).split()
    if not answer_tokens or not reference_tokens:
        return float(answer_tokens == reference_tokens)
    common = sum((Counter(answer_tokens) & Counter(reference_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer_tokens), common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(answer, reference):
    """1.0 when the normalized answer and reference are the same text."""
    return float(normalize(answer) == normalize(reference))


def percentile(values, q):
    """The q-th percentile (0-100) with numpy's default linear interpolation; None without values."""
    import numpy

    return float(numpy.percentile(values, q)) if values else None


def summarize(rows):
    """Overall metrics; a failed line scores 0 and its latency is left out."""
    latencies = [row["latency_s"] for row in rows if row["error"] is None and row["latency_s"] is not None]
    count = len(rows)
    return {
        "rows": count,
        "errors": sum(row["error"] is not None for row in rows),
        "exact_match": sum(row["exact_match"] for row in rows) / count if count else 0.0,
        "token_f1": sum(row["f1"] for row in rows) / count if count else 0.0,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
    }


def summary_table(summaries):
    """A Markdown table with one column per endpoint."""
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        ("questions", lambda s: str(s["rows"])),
        ("errors", lambda s: str(s["errors"])),
        ("exact match", lambda s: number(s["exact_match"], 3)),
        ("token F1", lambda s: number(s["token_f1"], 3)),
        ("latency p50 (s)", lambda s: number(s["latency_p50_s"], 2)),
        ("latency p95 (s)", lambda s: number(s["latency_p95_s"], 2)),
    ]
    table = ["| metric | " + " | ".join(summaries) + " |", "|---|" + "---:|" * len(summaries)]
    table += [f"| {name} | " + " | ".join(cell(s) for s in summaries.values()) + " |" for name, cell in lines]
    return "\n".join(table) + "\n"
