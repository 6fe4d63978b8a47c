"""Exact match for `evaluate`, shipped with hf_moe so it loads offline: `evaluate.load(EXACT_MATCH_PATH)`."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference after normalisation (case, spaces, final period)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated answers.
    references (`list[str]`): expected answers.
Returns:
    exact_match (`float`): fraction of exact matches in [0, 1].
"""


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!").split())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        matches = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(matches) / max(len(matches), 1)}
