"""Run the suites in an ephemeral GX context and read the results back as named problems."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import great_expectations as gx
from great_expectations.data_context.types.base import ProgressBarsConfig

from components.common.schema import where
from components.validate.suites import Table

# GX pins this logger to INFO on import (one line per context); the rest is quieted in __init__
logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
MAX_EXAMPLES = 10
_VALUE_CHARS = 60


@dataclass
class Outcome:
    """One expectation's result, in words."""

    suite: str
    success: bool
    kind: str  # "expect_column_values_to_be_unique"
    kwargs: dict  # {"column": "note_id"}
    severity: str  # "critical" stops the pipeline, "warning" is reported
    observed: str
    # "notes_test.csv row 1; notes_test.csv row 4, field 'noteid': note id 't1' appears ..."
    examples: list[str]

    @property
    def expectation(self) -> str:
        """The call as in suites.py: ``expect_column_values_to_be_unique(column='note_id')``."""
        def short(v):
            return v if not isinstance(v, list) or len(v) <= 5 else [*v[:5], "..."]

        return f"{self.kind}({', '.join(f'{k}={short(v)!r}' for k, v in self.kwargs.items())})"

    @property
    def fatal(self) -> bool:
        return not self.success and self.severity == "critical"

    def text(self) -> str:
        head = f"{self.suite}: {self.expectation} failed; observed {self.observed}"
        return head + "".join(f"\n    {e}" for e in self.examples)


def validate(tables: list[Table]) -> dict[str, dict]:
    """{table name: GX suite validation result as JSON}."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("canonical")
    results = {}
    for t in tables:
        batch = source.add_dataframe_asset(t.name).add_batch_definition_whole_dataframe(t.name)
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=t.name, data=batch, suite=context.suites.add(t.suite)))
        # SUMMARY keeps MAX_EXAMPLES failing rows per expectation: the result stays small however
        # many rows fail, and each example carries its file and row
        result = definition.run(batch_parameters={"dataframe": t.frame}, result_format={
            "result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES,
            "unexpected_index_column_names": [c for c in t.row_columns if c in t.frame]})
        results[t.name] = result.to_json_dict()
    return results


def outcomes(table: Table, result: dict) -> list[Outcome]:
    return [outcome(table, r) for r in result["results"]]


def outcome(table: Table, r: dict) -> Outcome:
    config, res = r["expectation_config"], r["result"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    if error := _exception(r.get("exception_info") or {}):
        observed = f"an error: {error}"
    elif "observed_value" in res:
        observed = f"{res['observed_value']!r}"
    else:
        checked = res["element_count"] - res.get("missing_count", 0)
        allowed = 1 - kwargs.get("mostly", 1.0)
        observed = (f"{res['unexpected_count']} of {checked} row(s) unexpected "
                    f"({res['unexpected_percent'] or 0:.2f}%; allowed {allowed:.2%})")
    return Outcome(suite=table.name, success=bool(r["success"]), kind=config["type"],
                   kwargs=kwargs, severity=config.get("severity", "critical"), observed=observed,
                   examples=_examples(table, config, res))


def _exception(info: dict) -> str | None:
    """GX reports an exception flat, or per metric (a dict of such dicts)."""
    if "raised_exception" in info:
        return (info.get("exception_message") or "unknown") if info["raised_exception"] else None
    return next((_exception(v) for v in info.values() if isinstance(v, dict) and _exception(v)),
                None)


def _examples(table: Table, config: dict, res: dict) -> list[str]:
    """Failing rows grouped by value: "f.csv row 1; f.csv row 4, field 'noteid': <problem>"."""
    rows = res.get("partial_unexpected_index_list") or []
    meta, kwargs = config.get("meta") or {}, config["kwargs"]
    checked = [kwargs["column"]] if "column" in kwargs else kwargs.get("column_list", [])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(str(row.get(c)) for c in checked)].append(row)
    out = []
    for group in groups.values():
        row = group[0]
        file = str(row.get("_file", table.name))
        fld = meta.get("field")
        if fld and file.endswith(".csv"):
            fld = table.csv_fields.get(fld, fld)
        places = "; ".join(where(str(g.get("_file", table.name)), g.get("_row")) for g in group)
        values = {k: _short(v) for k, v in row.items()}
        values["value"] = _short(row.get(checked[0])) if len(checked) == 1 else None
        try:
            problem = meta.get("problem", "unexpected value {value!r}").format_map(values)
        except (KeyError, IndexError, ValueError):  # a template naming a column not returned
            problem = f"unexpected value(s) {values!r}"
        out.append(f"{places}{f', field {fld!r}' if fld else ''}: {problem}")
    return out


def _short(v):
    if isinstance(v, str) and len(v) > _VALUE_CHARS:
        return v[:_VALUE_CHARS] + "…"
    return v
