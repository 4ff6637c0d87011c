"""The canary ramp (`graft promote --ramp`): the challenger answers a growing share of live traffic (serving.canary,
deploy/canary.py), step by step (promotion.canary.steps), and each step is judged on what the servers captured
(serving.capture) before the next: enough answers of the canary at this step, and on the answers with a feedback
label since the ramp began, the canary not significantly worse than the champion (Fisher's exact test: the two
answered different requests). The last step, 100%, ends in the champion alias moving to the canary's version.

A refused step, an error or an interruption sets the share back to 0 at once: a ramp never leaves traffic on a
version no one is watching. Every share change is an audit record (graft history).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from components.gates import FAILED, PASSED, SKIPPED, Gate, UnpairedComparison, at_least, worse_gate
from components.registry import (
    CHAMPION,
    AliasMove,
    RegistryError,
    alias_version,
    canary_share,
    promote,
    set_canary_share,
)
from components.settings import CanaryRampParams, GateParams, Settings
from deploy.capture import iter_items


@dataclass(frozen=True)
class CanaryEvidence:
    champion: str
    canary: str
    share: float  # the step's percent
    answers: int  # the canary's captured answers since the step began
    comparison: UnpairedComparison | None  # labelled answers since the ramp began: canary (a) against champion (b)

    @property
    def labelled(self) -> int:
        return self.comparison.examples_a if self.comparison else 0


def collect_canary_evidence(folder: str | Path, champion: str, canary: str, share: float, step_began: datetime,
                            ramp_began: datetime, confidence: float) -> CanaryEvidence:
    answers, right, labelled = 0, {champion: 0, canary: 0}, {champion: 0, canary: 0}
    for item in iter_items(folder):
        version = item.record["version"]
        if version not in right or item.time < ramp_began:
            continue
        answers += version == canary and item.time >= step_began
        if item.label is not None:
            labelled[version] += 1
            right[version] += item.label == item.predicted
    comparison = None
    if labelled[canary]:
        comparison = UnpairedComparison(right[canary], labelled[canary], right[champion], labelled[champion], confidence)
    return CanaryEvidence(champion, canary, share, answers, comparison)


def canary_gates(evidence: CanaryEvidence, rules: CanaryRampParams, gates: GateParams) -> list[Gate]:
    found = [at_least("canary.requests", evidence.answers, rules.min_requests,
                       f"{evidence.answers} captured answers of v{evidence.canary} at {evidence.share:g}%, "
                       f"promotion.canary.min_requests is {rules.min_requests}: the ramp reads the servers' capture "
                       f"(serving.capture on, into this project's serving.capture.folder)")]
    if rules.min_labelled:
        found.append(at_least("canary.labelled", evidence.labelled, rules.min_labelled,
                              f"{evidence.labelled} of its answers have a feedback label, promotion.canary.min_labelled "
                              f"is {rules.min_labelled}: send labels to POST /feedback"))
    if evidence.comparison is None or not evidence.comparison.examples_b:
        found.append(Gate("canary.not_worse", SKIPPED, None, "", "no labelled answers of both versions"))
    else:
        found.append(worse_gate("canary.not_worse", evidence.comparison, gates, "canary", "champion",
                                "worse than the champion on labelled live requests"))
    return found


def canary_verdict(found: list[Gate]) -> tuple[bool, str]:
    """Whether the step holds, and why not in one line (a not-worse check without labels is not a refusal: labels
    are required only through promotion.canary.min_labelled)."""
    against = [gate for gate in found if gate.verdict == FAILED
               or (gate.verdict != PASSED and gate.name != "canary.not_worse")]
    return (False, "; ".join(gate.detail for gate in against)) if against else (True, "every canary gate passed")


def _report(root: Path, evidence: CanaryEvidence, found: list[Gate], passed: bool) -> None:
    reports = root / "reports"
    reports.mkdir(exist_ok=True)
    lines = [f"## Canary: v{evidence.canary} at {evidence.share:g}% of live traffic, v{evidence.champion} the rest", "",
             f"{evidence.answers} canary answers at this step; labelled since the ramp began: "
             f"{evidence.comparison.text('canary', 'champion') if evidence.comparison else 'none'}", "",
             "| gate | verdict | value | bound | detail |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {g.name} | {g.verdict} | {'' if g.value is None else f'{g.value:.4g}'} | {g.bound} | {g.detail} |"
              for g in found]
    (reports / "canary.md").write_text("\n".join(lines) + "\n")
    (reports / "canary.json").write_text(json.dumps(
        {"evidence": {**asdict(evidence), "comparison": asdict(evidence.comparison) if evidence.comparison else None},
         "gates": [asdict(gate) for gate in found], "passed": passed}, indent=2) + "\n")


def _wait_for_answers(collect: Callable[[], CanaryEvidence], rules: CanaryRampParams,
                      say: Callable[[str], None]) -> CanaryEvidence:
    """The step's evidence once it has promotion.canary.min_requests answers, or when the step's time is up."""
    deadline = time.monotonic() + 60 * rules.step_timeout_minutes
    said = time.monotonic()
    while True:
        evidence = collect()
        if evidence.answers >= rules.min_requests or time.monotonic() >= deadline:
            return evidence
        if time.monotonic() - said >= 60:
            say(f"  {evidence.answers}/{rules.min_requests} canary answers captured at {evidence.share:g}%")
            said = time.monotonic()
        time.sleep(rules.poll_seconds)


def ramp(root: str | Path, params: Settings, client, name: str, say: Callable[[str], None] = print) -> AliasMove:
    """Ramp the version behind serving.canary.alias through promotion.canary.steps, judged between steps; at 100%
    move the champion alias to it (promote: its gates and file checked again) and end the canary. The share is 0
    again after a refused step, an error or an interruption (RegistryError says why)."""
    root, rules, alias = Path(root), params.promotion.canary, params.serving.canary.alias
    version, champion = alias_version(client, name, alias), alias_version(client, name, CHAMPION)
    if version is None or champion is None:
        raise RegistryError(f"{name} has no {alias if version is None else CHAMPION!r} version: nothing to ramp")
    folder, lead = root / params.serving.capture.folder, params.serving.switch_lead_seconds
    began = datetime.now(timezone.utc)
    try:
        for number, share in enumerate(rules.steps[:-1], 1):
            move = set_canary_share(client, name, alias, share, reason=f"ramp step {number}/{len(rules.steps)}",
                                    lead_seconds=lead)
            step_began = datetime.fromisoformat(move.effective)  # when the servers switch to it
            say(f"step {number}/{len(rules.steps)}: v{version} answers {share:g}% of live traffic; waiting for "
                f"{rules.min_requests} of its answers in {folder}")
            evidence = _wait_for_answers(lambda: collect_canary_evidence(
                folder, champion, version, share, step_began, began, params.gates.confidence), rules, say)
            found = canary_gates(evidence, rules, params.gates)
            ok, why = canary_verdict(found)
            _report(root, evidence, found, ok)
            if not ok:
                set_canary_share(client, name, alias, 0, "rollback", f"ramp refused at {share:g}%: {why}", lead)
                raise RegistryError(f"refusing to promote {name} v{version}: at {share:g}% of live traffic {why}; its "
                                    f"share is back to 0 (reports/canary.md)")
            say(f"  passed: {evidence.answers} answers" + (f", {evidence.comparison.text('canary', 'champion')}"
                                                            if evidence.comparison else ""))
        set_canary_share(client, name, alias, 100, reason=f"ramp step {len(rules.steps)}/{len(rules.steps)}",
                         lead_seconds=lead)
        move = promote(client, name, version, reason=f"canary ramp {', '.join(f'{s:g}%' for s in rules.steps)}",
                       lead_seconds=lead)
    except BaseException:
        if canary_share(client, name) > 0 and alias_version(client, name, CHAMPION) != version:  # traffic back at once
            set_canary_share(client, name, alias, 0, "rollback", "ramp stopped", lead)
        raise
    set_canary_share(client, name, alias, 0, reason=f"v{version} is the champion: the canary ends", lead_seconds=lead)
    return move
