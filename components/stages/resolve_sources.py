"""resolve_sources: the identity (weights sha256, normalisation, input size) of every pretrained candidate."""
from __future__ import annotations

from components.artifacts import write_json
from components.config import Params
from components.layout import Layout
from components.source_models import resolve_pretrained_sources


def resolve_sources(params: Params) -> dict:
    """The identity (weights sha256, normalisation, size) of every pretrained candidate; downloads named
    weights into the torch hub cache when online. DVC runs it every time (always_changed): a weights file that
    changed makes the stages that used it run again, an unchanged one changes nothing."""
    identities = resolve_pretrained_sources(params)
    write_json(Layout.pretrained_sources, identities)
    # Folders that per-name stages fill and a later stage depends on as a whole, also when no stage fills them.
    for folder in (Layout.sources, Layout.prepared_sources, Layout.prepared_unlabeled):
        folder.mkdir(parents=True, exist_ok=True)
    return identities
