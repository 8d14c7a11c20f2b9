"""A one-file HTML page of the GX results, for the KFP UI (``Output[HTML]``).

GX's own Data Docs pages load Bootstrap, jQuery, Vega and fonts from CDNs and link to sibling
pages of a docs site, so one copied page shows unstyled, or not at all, in the KFP UI's sandboxed
viewer on a cluster without internet. This page is rendered from the same validation results
with inline CSS and no scripts: one section per suite, one row per expectation with its observed
value and failing rows named by file, row and field.
"""

from __future__ import annotations

from html import escape

from components.validate.engine import Outcome

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.6em 0 .4em}
.meta{color:#666;font-size:.9em} .banner{padding:.5em .8em;border-radius:4px;font-weight:600}
.ok{background:#e6f4ea;color:#1e6b34} .bad{background:#fce8e6;color:#a50e0e}
.warn{background:#fef7e0;color:#7a5700}
table{border-collapse:collapse;width:100%;margin:.3em 0} th,td{border:1px solid #ddd;
padding:.3em .5em;text-align:left;vertical-align:top} th{background:#f5f5f5}
code{font:12px ui-monospace,Menlo,Consolas,monospace;word-break:break-word}
td.s{width:5.5em;text-align:center;font-weight:600} ul{margin:.2em 0;padding-left:1.2em}
"""


def _status(o: Outcome) -> tuple[str, str]:
    if o.success:
        return "ok", "passed"
    return ("bad", "FAILED") if o.fatal else ("warn", "warning")


def render(*, success: bool, outcomes: list[Outcome], rows: dict[str, int],
           stats: dict[str, object], dropped: list[dict], suite_version: str,
           gx_version: str) -> str:
    suites = list(dict.fromkeys(o.suite for o in outcomes))
    out = ["<!doctype html><html><head><meta charset='utf-8'>",
           "<title>Data validation</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Data validation</h1>",
           f"<p class='banner {'ok' if success else 'bad'}'>"
           f"{'passed' if success else 'FAILED: the pipeline stops here'}</p>",
           f"<p class='meta'>Great Expectations {escape(gx_version)}, suites version "
           f"{escape(suite_version)} (components/validate/suites.py). Full results: "
           "gx_results.json in the report artifact.</p>",
           "<h2>Suites</h2><table><tr><th>suite</th><th>rows</th><th>expectations</th>"
           "<th>passed</th><th>failed</th><th>warnings</th></tr>"]
    for s in suites:
        mine = [o for o in outcomes if o.suite == s]
        out.append(f"<tr><td><a href='#{escape(s)}'>{escape(s)}</a></td><td>{rows.get(s, '')}"
                   f"</td><td>{len(mine)}</td><td>{sum(o.success for o in mine)}</td>"
                   f"<td>{sum(o.fatal for o in mine)}</td>"
                   f"<td>{sum(not o.success and not o.fatal for o in mine)}</td></tr>")
    out.append("</table>")
    for s in suites:
        out.append(f"<h2 id='{escape(s)}'>{escape(s)}</h2><table><tr><th>status</th>"
                   "<th>expectation</th><th>observed</th><th>rows (examples)</th></tr>")
        for o in (o for o in outcomes if o.suite == s):
            cls, word = _status(o)
            examples = "".join(f"<li>{escape(e)}</li>" for e in o.examples)
            out.append(f"<tr><td class='s {cls}'>{word}</td><td><code>{escape(o.expectation)}"
                       f"</code></td><td>{escape(o.observed)}</td><td>"
                       f"{f'<ul>{examples}</ul>' if examples else ''}</td></tr>")
        out.append("</table>")
    if dropped:
        out.append(f"<h2>Dropped notes ({len(dropped)})</h2><table><tr><th>note</th>"
                   "<th>where</th><th>problem</th></tr>")
        out += [f"<tr><td>{escape(d['note_id'])}</td><td>{escape(d['where'])}</td>"
                f"<td>{escape(d['problem'])}</td></tr>" for d in dropped[:200]]
        out.append("</table>" + ("<p>… the full list is dropped_notes.json</p>"
                                 if len(dropped) > 200 else ""))
    out.append("<h2>Statistics</h2><table><tr><th>statistic</th><th>value</th></tr>")
    out += [f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in stats.items()]
    out.append("</table></body></html>")
    return "\n".join(out)
