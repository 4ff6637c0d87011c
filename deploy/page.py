"""The page at `/`: what is served (version, provider, metrics, gate verdicts) and an image upload to try it."""
from __future__ import annotations

from html import escape

from deploy.tags import LINEAGE_TAGS, METRIC_PREFIX, gate_verdicts, metric_tag


def _rows(items: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in items)


def _canary_line(canary: tuple[str, float] | None) -> str:
    if canary is None:
        return ""
    version, share = canary
    return f' Version <b id="canary">{escape(version)}</b> answers {share:g}% of requests (canary).'


def render_page(model: str, version: str | None, provider: str | None, tags: dict[str, str], classes: list[str],
                canary: tuple[str, float] | None = None) -> str:
    """`canary`: the version answering a share of requests and its percent, while one does."""
    if version is None:
        body = "<p id='status'>Loading the model&hellip; this page works once /v2/health/ready says ready.</p>"
    else:
        shown = [metric_tag(name) for name in ("test.accuracy", "test.macro_f1", "scratch.test.accuracy", "transfer_gain")]
        metrics = [(k.removeprefix(METRIC_PREFIX), tags[k]) for k in shown if k in tags]
        gates = sorted(gate_verdicts(tags).items())
        lineage = [(k.removeprefix("graft."), v) for k, v in sorted(tags.items()) if k in LINEAGE_TAGS]
        body = f"""
<p id="status">Serving <b id="model">{escape(model)}</b> version <b id="version">{escape(version)}</b>
on <b id="provider">{escape(provider or '')}</b>.{_canary_line(canary)}</p>
<div class="cols">
<table><caption>Test metrics</caption>{_rows(metrics) or '<tr><td>none recorded</td></tr>'}</table>
<table><caption>Gates</caption>{_rows(gates) or '<tr><td>none recorded</td></tr>'}</table>
<table><caption>Lineage</caption>{_rows(lineage) or '<tr><td>none recorded</td></tr>'}</table>
</div>
<h2>Try it</h2>
<form id="upload"><input type="file" id="file" accept="image/*"> <button type="submit">Predict</button></form>
<p class="muted">Classes: {escape(', '.join(classes))}</p>
<ol id="result"></ol>
<p id="error" class="error"></p>"""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Graft: {escape(model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #222; }}
.cols {{ display: flex; gap: 2rem; flex-wrap: wrap; }} table {{ border-collapse: collapse; }}
caption {{ font-weight: bold; text-align: left; }} th, td {{ padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: left; }}
.muted {{ color: #777; }} .error {{ color: #b00; }}
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
