"""Scores of answers against reference answers, and their summary: what evaluate_flow.py reports.

    evaluate(data=..., evaluators=evaluators(), evaluator_config=COLUMN_MAPPING)   # azure.ai.evaluation's
    summarize(rows), summary_table({"fine-tuned": ..., "base": ...}), comparison_chart(summaries, "x.png")

The scores come from azure-ai-evaluation's offline evaluators: F1ScoreEvaluator (token F1 after SQuAD's answer
normalization) and RougeScoreEvaluator (ROUGE-L: the longest common word sequence, so word order counts),
plus exact match, which the library has no offline evaluator for (its AzureOpenAIStringCheckGrader runs on
Azure OpenAI and does not normalize). BLEU, GLEU and METEOR are optional: they need NLTK data (downloaded
on first use). Latency percentiles with numpy, the one definition of a percentile in this project (bench/
uses it too); the side-by-side Markdown table and the comparison picture.
"""

import re
import string

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)

# Each score of a row: the evaluator's name in evaluate() -> (the key of its result, the name in tables).
SCORES = {
    "exact_match": ("exact_match", "exact match"),
    "f1_score": ("f1_score", "F1"),
    "rouge_l": ("rouge", "ROUGE-L"),
    "bleu": ("bleu", "BLEU"),
    "gleu": ("gleu", "GLEU"),
    "meteor": ("meteor", "METEOR"),
}
# The library's names for the two texts (response, ground_truth) <- the columns of our rows.
COLUMN_MAPPING = {"default": {"column_mapping": {"response": "${data.answer}", "ground_truth": "${data.reference}"}}}
# What azure-ai-evaluation 1.18.10's BLEU, GLEU and METEOR load, and download when missing
# (azure/ai/evaluation/_common/utils.py, ensure_nltk_data_downloaded): id -> resource.
NLTK_DATA = {"wordnet": "corpora/wordnet.zip", "perluniprops": "misc/perluniprops.zip",
             "punkt": "tokenizers/punkt.zip", "punkt_tab": "tokenizers/punkt_tab.zip"}


def normalize(text):
    """SQuAD's answer normalization: lower-case, punctuation deleted, articles dropped, whitespace collapsed."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def exact_match(answer, reference):
    """1.0 when the normalized answer and reference are the same text."""
    return float(normalize(answer) == normalize(reference))


def exact_match_evaluator(*, response, ground_truth):
    """Exact match as an evaluate() evaluator: the library reads the inputs from the parameters' names."""
    return {"exact_match": exact_match(response, ground_truth)}


def evaluators(nltk_metrics=False):
    """The evaluators for evaluate(), by name; nltk_metrics adds BLEU, GLEU and METEOR (need NLTK data)."""
    from azure.ai.evaluation import F1ScoreEvaluator, RougeScoreEvaluator, RougeType

    chosen = {"exact_match": exact_match_evaluator, "f1_score": F1ScoreEvaluator(),
              "rouge_l": RougeScoreEvaluator(rouge_type=RougeType.ROUGE_L)}
    if nltk_metrics:
        from azure.ai.evaluation import BleuScoreEvaluator, GleuScoreEvaluator, MeteorScoreEvaluator

        chosen.update(bleu=BleuScoreEvaluator(), gleu=GleuScoreEvaluator(), meteor=MeteorScoreEvaluator())
    return chosen


def missing_nltk_data():
    """The NLTK data BLEU, GLEU and METEOR need that is neither installed nor downloadable now (offline: all)."""
    import io

    import nltk

    missing = []
    for name, resource in NLTK_DATA.items():
        try:
            nltk.find(resource)
        except LookupError:
            # Quietly: offline, nltk prints each failed download; the caller says it once.
            if not nltk.download(name, quiet=True, print_error_to=io.StringIO()):
                missing.append(name)
    return missing


def scores_of(result_row):
    """The scores in one row of evaluate()'s result, by name; None where the evaluator failed on it."""
    scores = {}
    for name, (key, _) in SCORES.items():
        column = f"outputs.{name}.{key}"
        if column in result_row:
            value = result_row[column]
            scores[name] = None if value is None or value != value else round(float(value), 4)  # NaN != NaN
    return scores


def percentile(values, q):
    """The q-th percentile (0-100) with numpy's default linear interpolation; None without values."""
    import numpy

    return float(numpy.percentile(values, q)) if values else None


def summarize(rows):
    """Overall metrics: the mean of each score (a failed line scores 0), errors, latency of the answered lines."""
    latencies = [row["latency_s"] for row in rows if row["error"] is None and row["latency_s"] is not None]
    count = len(rows)
    summary = {"rows": count, "errors": sum(row["error"] is not None for row in rows)}
    for name in SCORES:
        if rows and name in rows[0]:
            summary[name] = sum(row[name] for row in rows) / count
    summary.update(latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95))
    return summary


def summary_table(summaries):
    """A Markdown table with one column per endpoint."""
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    first = next(iter(summaries.values()))
    lines = [("questions", lambda s: str(s["rows"])), ("errors", lambda s: str(s["errors"]))]
    lines += [(title, lambda s, name=name: number(s[name], 3)) for name, (_, title) in SCORES.items() if name in first]
    lines += [("latency p50 (s)", lambda s: number(s["latency_p50_s"], 2)),
              ("latency p95 (s)", lambda s: number(s["latency_p95_s"], 2))]
    table = ["| metric | " + " | ".join(summaries) + " |", "|---|" + "---:|" * len(summaries)]
    table += [f"| {name} | " + " | ".join(cell(s) for s in summaries.values()) + " |" for name, cell in lines]
    return "\n".join(table) + "\n"


def comparison_chart(summaries, path):
    """A PNG of grouped bars, one colour per endpoint: the mean scores (left) and latency p50/p95 (right)."""
    from matplotlib.figure import Figure  # not pyplot: drawn by the Agg renderer, no window, no global state

    first = next(iter(summaries.values()))
    panels = {"mean score (higher is better)": [(title, name) for name, (_, title) in SCORES.items() if name in first],
              "latency, s (lower is better)": [("p50", "latency_p50_s"), ("p95", "latency_p95_s")]}
    figure = Figure(figsize=(10, 4), layout="constrained")
    width = 0.8 / len(summaries)
    axes_pair = figure.subplots(1, 2, width_ratios=[len(bars) for bars in panels.values()])
    for axes, (ylabel, bars) in zip(axes_pair, panels.items()):
        for i, (label, summary) in enumerate(summaries.items()):
            offset = (i - (len(summaries) - 1) / 2) * width
            values = [summary[key] or 0.0 for _, key in bars]  # no latency when no line was answered
            axes.bar_label(axes.bar([x + offset for x in range(len(bars))], values, width, label=label),
                           fmt="%.2f", fontsize=8)
        axes.set_xticks(range(len(bars)), [title for title, _ in bars])
        axes.set_ylabel(ylabel)
        axes.margins(y=0.15)
    axes_pair[0].set_ylim(0, 1.1)
    axes_pair[0].legend(loc="upper right")
    figure.suptitle(f"Evaluation of the flow on {first['rows']} test question(s)")
    figure.savefig(path, dpi=120)
    return path
