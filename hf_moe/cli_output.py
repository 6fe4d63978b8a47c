"""What `hf-moe` prints: a report for people by default, JSON for machines with `--json`.

A command returns its result instead of printing it: plain data (a dict, a list of row dicts, a string) or a
`Report` carrying both the data and a text written for people. `render` turns either into what is printed:

- `--json`: the data as one JSON document (every field the command computed);
- otherwise the `Report`'s text, or for plain data a generic layout: a list of row dicts is an aligned table
  (`hf_moe.text_table`), a dict is a key/value summary (nested dicts indented, lists of row dicts as tables under
  their key).
"""

import json
from dataclasses import dataclass

from .text_table import format_value, table


@dataclass
class Report:
    """A command's result: `data` (JSON-serialisable, for `--json`) and `text` (for people)."""

    data: object
    text: str


def _is_rows(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)


def summary(data: dict, indent: int = 0) -> str:
    """A key/value summary of `data`: nested dicts indented under their key, lists of row dicts as tables."""
    pad = " " * indent
    width = max((len(str(key)) for key, value in data.items() if not isinstance(value, dict) and not _is_rows(value)),
                default=0)
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            lines += [f"{pad}{key}:", summary(value, indent + 2)]
        elif _is_rows(value):
            lines += [f"{pad}{key}:", *(pad + "  " + row for row in table(value).splitlines())]
        else:
            lines.append(f"{pad}{str(key).ljust(width)}  {format_value(value)}".rstrip())
    return "\n".join(lines)


def render(result, as_json: bool = False) -> str:
    """What to print for a command's `result` (`Report`, dict, list of row dicts, string or None)."""
    data = result.data if isinstance(result, Report) else result
    if as_json:
        return json.dumps(data, indent=1, ensure_ascii=False)
    if isinstance(result, Report):
        return result.text
    if isinstance(data, dict):
        return summary(data)
    if _is_rows(data):
        return table(data)
    return "" if data is None else str(data)


def format_verification(report: dict, candidate: str = "upcycled", reference: str = "dense") -> str:
    """A verification report for people: one summary line and a table with a row per prompt (the prompt, both
    answers, max |Δlogit|, identical?). `reference` / `candidate`: the sample keys of the two answers."""
    heading = (f"verification: {report['identical_generations']}/{report['inputs']} greedy generations identical, "
               f"max |Δlogit| {report['max_abs_logit_difference']:.2g}")
    if not report["samples"]:
        return heading
    columns = {"prompt": "prompt", reference: f"{reference} answer", candidate: f"{candidate} answer",
               "max_abs_logit_difference": "max |Δlogit|", "identical": "identical?"}
    columns = {key: name for key, name in columns.items() if key in report["samples"][0]}
    return f"{heading}\n{table(report['samples'], columns)}"
