"""The evaluation report as the KFP UI shows it: Markdown and HTML with the charts embedded.

``report.md`` links its charts by file name, which renders beside the PNGs (the evaluation
folder, the MLflow artifacts, an editor) but not in the KFP UI, whose viewers get one file and no
folder. :func:`inline_images` replaces each such link by a ``data:`` URI of the file, and
:func:`report_html` renders the same report as one self-contained HTML page (the KFP UI shows an
``HTML`` artifact in a sandboxed frame; the MLflow UI shows ``report.html`` among the artifacts).
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re

from components.common import storage

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
EMBEDDED = ("data:", "http://", "https://")


def inline_images(markdown: str, folder: str) -> str:
    """``![alt](chart.png)`` → ``![alt](data:image/png;base64,…)`` with the bytes of
    ``folder/chart.png`` (local or gs://); a link to a file that is not there becomes its alt
    text in italics. Absolute links and data URIs are kept."""
    def embed(m: re.Match) -> str:
        alt, target = m.groups()
        if target.startswith(EMBEDDED):
            return m.group(0)
        uri = storage.join(folder, target)
        if not storage.exists(uri):
            return f"*({alt}: no chart)*"
        mime = mimetypes.guess_type(target)[0] or "application/octet-stream"
        data = base64.b64encode(storage.read_bytes(uri)).decode("ascii")
        return f"![{alt}](data:{mime};base64,{data})"

    return IMAGE.sub(embed, markdown)


def _inline(text: str) -> str:
    """Escaped text with the inline Markdown the reports use: images, **bold**, *italics*,
    `code`."""
    out, last = [], 0
    for m in IMAGE.finditer(text):
        out.append(_spans(text[last:m.start()]))
        alt, src = m.groups()
        if src.startswith(EMBEDDED):
            out.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src)}">')
        last = m.end()
    out.append(_spans(text[last:]))
    return "".join(out)


def _spans(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", text)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def markdown_html(markdown: str) -> str:
    """The body of the Markdown subset the reports are written in: ATX headings, paragraphs,
    ``- `` lists, pipe tables (numbers right-aligned) and images."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            n = len(m.group(1))
            blocks.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            body = rows[2:] if len(rows) > 1 and all(re.fullmatch(r":?-+:?", c)
                                                     for c in rows[1]) else rows[1:]
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            trs = []
            for r in body:
                tds = "".join(
                    f'<td class="num">{_inline(c)}</td>'
                    if re.fullmatch(r"[-+]?\d[\d.,]*|\[.*\]|[-+]?\d.*\(.*\)", c)
                    else f"<td>{_inline(c)}</td>" for c in r)
                trs.append(f"<tr>{tds}</tr>")
            blocks.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}"
                          "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            blocks.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(
                    r"#{1,6} |\s*\||- ", lines[i]):
                para.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(blocks)


STYLE = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;
color:#222;max-width:1100px}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f3f3f3}td.num{text-align:right;
font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}h1{font-size:1.5em}
h2{font-size:1.2em;margin-top:1.4em}"""


def report_html(markdown: str, folder: str, title: str = "NoteLLM-2 evaluation") -> str:
    """One self-contained HTML page of a Markdown report whose images lie in ``folder``."""
    body = markdown_html(inline_images(markdown, folder))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def has_relative_images(text: str) -> bool:
    """Whether Markdown or HTML still links an image by a relative path (what the KFP UI's
    viewers cannot show)."""
    targets = [m.group(2) for m in IMAGE.finditer(text)]
    targets += re.findall(r"<img[^>]*\bsrc=\"([^\"]*)\"", text)
    return any(not t.startswith(EMBEDDED) for t in targets)
