"""The page at `/`: the face of the served version's model card (what it scores, with readable names; every gate's
value against its bound; its source and the variant served; its calibration), the card itself, and an image upload
to try it."""
from __future__ import annotations

import re
from html import escape

from deploy.tags import CARD_MISTAKES, LINEAGE_TAGS, gate_tag, gate_verdicts, metric_tag, source_tag

# Metric tag name -> what a person reads, and how its value is shown.
HEADLINE = (("test.accuracy", "Test accuracy", "percent"), ("test.macro_f1", "Macro-F1", "plain"),
            ("scratch.test.accuracy", "The same network trained from scratch", "percent"),
            ("transfer_gain", "Gain from transfer", "points"),
            ("calibration.ece", "Calibration error (ECE)", "plain"),
            ("calibration.ece_before", "Calibration error before temperature scaling", "plain"),
            ("calibration.temperature", "Temperature (in the served file)", "plain"))


def _shown(value: str, how: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return {"percent": f"{100 * number:.2f}%", "points": f"{100 * number:+.2f} points"}.get(how, f"{number:.4g}")


def _rows(items: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in items)


def _gate_rows(tags: dict[str, str]) -> str:
    rows = []
    for name, verdict in sorted(gate_verdicts(tags).items()):
        value, bound = tags.get(gate_tag(name, "value"), ""), tags.get(gate_tag(name, "bound"), "")
        rows.append(f"<tr class='{escape(verdict)}'><th>{escape(name)}</th><td>{escape(verdict)}</td>"
                    f"<td>{escape(value)}</td><td>{escape(bound)}</td></tr>")
    return "".join(rows)


def _source_line(tags: dict[str, str]) -> str:
    name = tags.get(source_tag("name"))
    if not name:
        return "not recorded"
    details = ", ".join(v for v in (tags.get(source_tag("kind")), tags.get(source_tag("architecture")),
                                    tags.get(source_tag("weights")), (tags.get(source_tag("image_size")) or "") and
                                    f"{tags[source_tag('image_size')]} px") if v)
    return f"{name} ({details})"


def _inline(text: str) -> str:
    text = escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_html(card: str) -> str:
    """The model card's Markdown as HTML: the subset components/card.py writes (headings, paragraphs, tables,
    lists, fenced blocks, bold, code), every text escaped."""
    html, table, block, items = [], [], None, []

    def flush() -> None:
        nonlocal table, items
        if table:
            head, *body = [row for i, row in enumerate(table) if i != 1]  # row 1 is the |---| rule
            html.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                        + "</table>")
            table = []
        if items:
            html.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items = []

    for line in card.splitlines():
        if block is not None:
            if line.startswith("```"):
                html.append(f"<pre>{escape(chr(10).join(block))}</pre>")
                block = None
            else:
                block.append(line)
            continue
        if line.startswith("```"):
            flush()
            block = []
        elif line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif line.startswith("- "):
            items.append(line[2:])
        else:
            flush()
            if heading := re.match(r"(#{1,3}) (.*)", line):
                level = len(heading[1]) + 1  # the page's own h1 is above the card
                html.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
            elif line.strip():
                html.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(html)


def _canary_line(canary: tuple[str, float] | None) -> str:
    if canary is None:
        return ""
    version, share = canary
    return f' Version <b id="canary">{escape(version)}</b> answers {share:g}% of requests (canary).'


def render_page(model: str, version: str | None, provider: str | None, tags: dict[str, str], classes: list[str],
                canary: tuple[str, float] | None = None, variant: str = "", card: str | None = None,
                mistakes_image: bool = False) -> str:
    """`canary`: the version answering a share of requests and its percent, while one does; `variant`: what is
    served and why; `card`: the version's model card (Markdown), when it has one; `mistakes_image`: the server has
    its gallery of most confident mistakes (at /card/mistakes.png)."""
    if version is None:
        body = "<p id='status'>Loading the model&hellip; this page works once /v2/health/ready says ready.</p>"
    else:
        metrics = [(label, _shown(tags[metric_tag(key)], how)) for key, label, how in HEADLINE if metric_tag(key) in tags]
        lineage = [("source", _source_line(tags))] + [(k.removeprefix("graft."), v) for k, v in sorted(tags.items())
                                                      if k in LINEAGE_TAGS]
        gates = _gate_rows(tags)
        card_html = (f"<details id='card' open><summary>Model card</summary>{markdown_html(card)}</details>" if card
                     else "<p id='card' class='muted'>This version has no model card (registered before Graft wrote "
                          "them, or served from a file).</p>")
        mistakes = (f"<h2>Its most confident mistakes on the test split</h2><img id='mistakes' src='/{CARD_MISTAKES}' "
                    f"alt='the most confident mistakes, each beside its Grad-CAM map' style='max-width: 100%'>"
                    if mistakes_image else "")
        body = f"""
<p id="status">Serving <b id="model">{escape(model)}</b> version <b id="version">{escape(version)}</b>
on <b id="provider">{escape(provider or '')}</b>, variant <b id="variant">{escape(variant or 'fp32')}</b>.{_canary_line(canary)}</p>
<div class="cols">
<table id="metrics"><caption>On the test split</caption>{_rows(metrics) or '<tr><td>none recorded</td></tr>'}</table>
<table id="lineage"><caption>Where it comes from</caption>{_rows(lineage)}</table>
</div>
<table id="gates"><caption>Gates: each value against its bound</caption>
<tr><th>gate</th><th>verdict</th><th>value</th><th>bound</th></tr>{gates or '<tr><td>none recorded</td></tr>'}</table>
{mistakes}
<h2>Try it</h2>
<form id="upload"><input type="file" id="file" accept="image/*"> <button type="submit">Predict</button></form>
<p class="muted">Classes: {escape(', '.join(classes))}</p>
<ol id="result"></ol>
<p id="error" class="error"></p>
{card_html}"""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Graft: {escape(model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #222; }}
.cols {{ display: flex; gap: 2rem; flex-wrap: wrap; }} table {{ border-collapse: collapse; }}
caption {{ font-weight: bold; text-align: left; }} th, td {{ padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: left; }}
.muted {{ color: #777; }} .error {{ color: #b00; }} tr.failed td {{ color: #b00; }} tr.skipped td {{ color: #777; }}
pre {{ background: #f6f6f6; padding: .5rem; overflow-x: auto; }} details {{ margin-top: 2rem; }}
summary {{ font-size: 1.3rem; font-weight: bold; cursor: pointer; }} #gates {{ margin-top: 1.5rem; }}
</style></head>
<body><h1>Graft model server</h1>{body}
<script>
const form = document.getElementById('upload');
if (form) form.addEventListener('submit', async (event) => {{
  event.preventDefault();
  const file = document.getElementById('file').files[0];
  const result = document.getElementById('result'), error = document.getElementById('error');
  result.innerHTML = ''; error.textContent = '';
  if (!file) {{ error.textContent = 'Choose an image file first.'; return; }}
  const data = new FormData(); data.append('file', file);
  const response = await fetch('/predict?top_k=3', {{ method: 'POST', body: data }});
  const answer = await response.json();
  if (!response.ok) {{ error.textContent = answer.error; return; }}
  for (const p of answer.predictions) {{
    const item = document.createElement('li');
    item.textContent = `${{p.class}}: ${{(100 * p.probability).toFixed(1)}}%`;
    result.appendChild(item);
  }}
  result.dataset.version = answer.model_version;
}});
</script></body></html>"""
