"""The evaluation report as the KFP UI shows it: images embedded, a self-contained HTML page."""

import base64

from components.evaluate.report import (
    has_relative_images,
    inline_images,
    markdown_html,
    report_html,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_image_links_become_data_uris_and_a_missing_chart_its_alt_text(tmp_path):
    (tmp_path / "recall_at_k.png").write_bytes(PNG)
    md = ("# T\n\n![recall@K](recall_at_k.png)\n\n![gone](missing.png) "
          "![web](https://example.com/a.png)\n")
    out = inline_images(md, str(tmp_path))
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert f"![recall@K]({uri})" in out
    assert "*(gone: no chart)*" in out and "![web](https://example.com/a.png)" in out
    assert has_relative_images(md) and not has_relative_images(out)
    assert has_relative_images('<p><img src="chart.png"></p>')
    assert not has_relative_images(f'<img alt="x" src="{uri}">')


def test_html_renders_the_report_subset_escaped(tmp_path):
    (tmp_path / "c.png").write_bytes(PNG)
    md = ("# NoteLLM-2 evaluation\n\nQueries: 5 <b>x</b>, *note* and `code`.\n\n"
          "| set | R@10 | Δ |\n| --- | --- | --- |\n| slice/a&b | 0.5000 | [-0.1, +0.2] |\n\n"
          "- one\n- two\n\n![chart](c.png)\n")
    body = markdown_html(md)
    assert "<h1>NoteLLM-2 evaluation</h1>" in body
    assert "5 &lt;b&gt;x&lt;/b&gt;, <em>note</em> and <code>code</code>." in body
    assert "<th>R@10</th>" in body and "<td>slice/a&amp;b</td>" in body
    assert '<td class="num">0.5000</td>' in body and "---" not in body
    assert "<ul><li>one</li><li>two</li></ul>" in body
    assert "<img" not in body  # a relative image is never linked from HTML
    page = report_html(md, str(tmp_path))
    assert page.startswith("<!DOCTYPE html>") and '<img alt="chart" src="data:image/png;base64,' \
        in page and not has_relative_images(page)
