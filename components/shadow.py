"""The evidence of shadow traffic (serving.shadow, deploy/shadow.py) and the `shadow` gate that judges it: whether a
challenger, run on the same live requests as the champion, may take the champion's place.

The server's capture folder holds, for each shadowed row, what the served model and the shadow predicted and how
long each model took (`<hour>/<batch>.shadow.jsonl`), and feedback labels (`<hour>/<item>.label.json`). For one pair
of versions this reads: how many rows were shadowed, how often both predicted the same class, both models' p95
latency, and on the labelled rows the paired comparison the candidate gates use (McNemar's exact test,
components/gates.py). `graft shadow report` prints it; `graft promote` refuses a challenger whose gate fails when
promotion.shadow.required is on (or --require-shadow is given).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.gates import FAILED, PASSED, SKIPPED, Gate, PairedComparison, at_least, at_most, worse_gate
from components.settings import GateParams, Settings, ShadowGateParams
from deploy.capture import iter_shadow_records, read_labels


@dataclass(frozen=True)
class ShadowEvidence:
    champion: str  # the served version
    challenger: str  # the shadow's version
    rows: int  # shadowed rows of this pair
    agreements: int  # of them, where both predicted the same class
    champion_p95_ms: float | None  # model latency on those rows
    challenger_p95_ms: float | None
    labelled: int  # of them, with a feedback label
    comparison: PairedComparison | None  # challenger (a) against champion (b) on the labelled rows

    @property
    def agreement(self) -> float | None:
        return self.agreements / self.rows if self.rows else None

    @property
    def latency_ratio(self) -> float | None:
        if not self.rows or not self.champion_p95_ms:
            return None
        return self.challenger_p95_ms / self.champion_p95_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "agreement": self.agreement, "latency_ratio": self.latency_ratio}


def collect_evidence(folder: str | Path, champion: str, challenger: str, confidence: float) -> ShadowEvidence:
    """What the capture folder holds on `challenger` shadowing `champion` (each row once, the first record kept)."""
    records: dict[str, dict] = {}
    for record in iter_shadow_records(folder):
        if record["served"]["version"] == champion and record["shadow"]["version"] == challenger:
            records.setdefault(record["id"], record)
    rows = list(records.values())
    if not rows:
        return ShadowEvidence(champion, challenger, 0, 0, None, None, 0, None)
    labels = read_labels(folder)
    labelled = [(row, labels[row["id"]]) for row in rows if row["id"] in labels]
    comparison = None
    if labelled:
        challenger_right = np.array([row["shadow"]["predicted"] == label for row, label in labelled])
        champion_right = np.array([row["served"]["predicted"] == label for row, label in labelled])
        comparison = PairedComparison.of(challenger_right, champion_right, confidence)

    def p95(model: str) -> float:
        return float(np.percentile([row[model]["latency_ms"] for row in rows], 95))

    return ShadowEvidence(champion, challenger, len(rows),
                          sum(row["served"]["predicted"] == row["shadow"]["predicted"] for row in rows),
                          p95("served"), p95("shadow"), len(labelled), comparison)


def shadow_gates(evidence: ShadowEvidence, rules: ShadowGateParams, gates: GateParams) -> list[Gate]:
    """Enough shadowed answers, agreement and latency within bounds, enough labels, and not worse on them."""
    pair = f"v{evidence.challenger} shadowing v{evidence.champion}"
    found = [at_least("shadow.requests", evidence.rows, rules.min_requests,
                       f"{evidence.rows} answers of {pair}, promotion.shadow.min_requests is {rules.min_requests}: "
                       f"serve longer with serving.shadow and serving.capture on")]
    if not evidence.rows:
        return found + [Gate(name, SKIPPED, None, "", "no shadowed answers")
                        for name in ("shadow.agreement", "shadow.latency_ratio", "shadow.labelled", "shadow.not_worse")]
    found += [
        at_least("shadow.agreement", evidence.agreement, rules.min_agreement,
                  f"{pair} predicted the champion's class on {evidence.agreement:.1%} of the answers, below "
                  f"promotion.shadow.min_agreement {rules.min_agreement:g}"),
        at_most("shadow.latency_ratio", evidence.latency_ratio, rules.max_latency_ratio,
                 f"its p95 model latency {evidence.challenger_p95_ms:.2f} ms is {evidence.latency_ratio:.2f}x the "
                 f"champion's {evidence.champion_p95_ms:.2f} ms, over promotion.shadow.max_latency_ratio "
                 f"{rules.max_latency_ratio:g}"),
        at_least("shadow.labelled", evidence.labelled, rules.min_labelled,
                  f"{evidence.labelled} of its answers have a feedback label, promotion.shadow.min_labelled is "
                  f"{rules.min_labelled}: send more labels to POST /feedback"),
    ]
    if evidence.comparison is None:
        found.append(Gate("shadow.not_worse", SKIPPED, None, "", "no labelled answers"))
    else:
        found.append(worse_gate("shadow.not_worse", evidence.comparison, gates, "challenger", "champion",
                                 "worse than the champion on labelled production requests"))
    return found


def verdict(found: list[Gate], rules: ShadowGateParams) -> tuple[bool, str]:
    """Whether the evidence lets the challenger be promoted, and why not in one line. Missing evidence (too few
    answers or labels) refuses as evidence against does."""
    failed = [gate for gate in found if gate.verdict == FAILED]
    if failed:
        return False, "; ".join(gate.detail for gate in failed)
    missing = [gate for gate in found if gate.verdict != PASSED]
    if missing:
        return False, "; ".join(f"{gate.name}: {gate.detail}" for gate in missing)
    return True, "every shadow gate passed"


def markdown(evidence: ShadowEvidence, found: list[Gate]) -> str:
    def number(value: float | None, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    lines = [f"## Shadow: v{evidence.challenger} on v{evidence.champion}'s live traffic", "",
             "| shadowed answers | agreement | champion p95 ms | challenger p95 ms | labelled | challenger minus "
             "champion (labelled) |", "| ---: | ---: | ---: | ---: | ---: | --- |",
             f"| {evidence.rows} | {number(evidence.agreement, '.1%')} | {number(evidence.champion_p95_ms, '.2f')} | "
             f"{number(evidence.challenger_p95_ms, '.2f')} | {evidence.labelled} | "
             f"{evidence.comparison.text('challenger', 'champion') if evidence.comparison else 'n/a'} |", "",
             "| gate | verdict | value | bound | detail |", "| --- | --- | --- | --- | --- |"]
    for gate in found:
        value = "" if gate.value is None else f"{gate.value:.4g}"
        lines.append(f"| {gate.name} | {gate.verdict} | {value} | {gate.bound} | {gate.detail} |")
    return "\n".join(lines)


def judge_shadow(root: str | Path, params: Settings, champion: str, challenger: str,
                 folder: str | Path | None = None) -> tuple[ShadowEvidence, list[Gate]]:
    """The evidence in the project's capture folder (serving.capture.folder, or `folder`) and its gates, written to
    reports/shadow.md and reports/shadow.json."""
    root = Path(root)
    folder = Path(folder) if folder else root / params.serving.capture.folder
    evidence = collect_evidence(folder, champion, challenger, params.gates.confidence)
    found = shadow_gates(evidence, params.promotion.shadow, params.gates)
    reports = root / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "shadow.md").write_text(markdown(evidence, found) + "\n")
    (reports / "shadow.json").write_text(json.dumps(
        {"evidence": evidence.to_dict(), "gates": [asdict(gate) for gate in found],
         "passed": verdict(found, params.promotion.shadow)[0]}, indent=2) + "\n")
    return evidence, found


def require_shadow_evidence(root: str | Path, params: Settings, client, name: str, version: str | None) -> None:
    """Refuse (RegistryError, one line) to promote `version` (default: the shadowed alias's) when its shadow
    evidence against the champion is missing or against it."""
    from components.registry import CHAMPION, RegistryError, alias_version

    alias = params.serving.shadow.alias
    version = version or alias_version(client, name, alias)
    champion = alias_version(client, name, CHAMPION)
    if version is None or champion is None:
        return  # nothing to promote, or nothing to compare with: promote() says which
    _, found = judge_shadow(root, params, champion, version)
    ok, why = verdict(found, params.promotion.shadow)
    if not ok:
        raise RegistryError(f"refusing to promote {name} v{version}: its shadow evidence against champion v{champion} "
                            f"does not hold ({why}); see reports/shadow.md")
