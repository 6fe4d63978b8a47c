"""Aligned text tables for people: the command line's reports, and the tables recipes put in text of their own (the
evaluation summary, the pruning benchmark). Plain strings, no dependency: the library, the recipes and the command
line may all use it."""

MAX_CELL = 48  # characters shown per table cell; --json has the full text


def format_value(value) -> str:
    """One table cell: yes / no, floats to 4 significant digits, "-" for None, lists comma-separated, one line."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    return " ".join(str(value).split())  # one line per cell


def table(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """An aligned text table of `rows`; `columns` maps keys to headings (default: every key, named as is).

    Long cells are cut to `MAX_CELL` characters; numeric columns are right-aligned.

    Example:
    ```python
    >>> print(table([{"layer": 0, "kept": [1, 3]}, {"layer": 1, "kept": [0, 2]}]))
    layer  kept
    -----  ----
        0  1, 3
        1  0, 2
    ```
    """
    columns = columns or {key: key for row in rows for key in row}
    cells = [[_cut(format_value(row.get(key))) for key in columns] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool) for row in rows)
               for key in columns]
    widths = [max([len(heading), *(len(line[i]) for line in cells)]) for i, heading in enumerate(columns.values())]

    def line(values):
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(list(columns.values())), line(["-" * width for width in widths]), *map(line, cells)])


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"
