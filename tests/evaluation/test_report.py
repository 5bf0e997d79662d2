"""The evaluation report: its model card says which decision rule the scores came from; its
headline figures carry their bootstrap intervals when the metrics have them."""

from __future__ import annotations

import numpy as np

from brainmri.evaluation import scoring
from brainmri.evaluation.report import card_section, kpis, per_class

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _rule(decision: dict) -> str:
    html = card_section({"classes": CLASSES, "decision": decision}, {}, None)
    return html.split("<b>Decision rule.</b> ", 1)[1].split("</p>", 1)[0]


def test_the_card_names_the_rule_applied_and_a_bias_that_was_refused():
    fitted = {"bias": 1.6, "recall": 1.0}
    kept = {"target": "glioma", "fitted": fitted, "adopted": True, "held_out": {"accuracy_change": 0.002}}
    assert _rule({"tta": True, "logit_bias": [1.6, 0, 0, 0], "decision": kept}) == \
        "logit bias glioma +1.60 + left-right flip averaging."
    refused = {**kept, "adopted": False, "held_out": {"accuracy_change": -0.0036}}
    assert _rule({"tta": True, "logit_bias": None, "decision": refused}) == (
        "plain argmax (a glioma logit bias of +1.60 fitted on validation was not kept: chosen on half "
        "the validation images, it cost 0.0036 accuracy on the other half) + left-right flip averaging.")
    # a model published before the half-split check: its record has no "adopted"
    assert _rule({"tta": False, "logit_bias": None, "decision": {"after": {"bias": 0.0}}}) == "plain argmax."


def test_headline_figures_show_their_intervals_and_old_metrics_still_render():
    y = np.repeat(np.arange(4), 25)
    probs = np.eye(4)[np.where(np.arange(100) % 7 == 0, (y + 1) % 4, y)] * 0.7 + 0.075
    m = scoring.classification(y, probs, CLASSES)
    m["interval"] = scoring.intervals(y, probs.argmax(1), CLASSES)
    lo, hi = m["interval"]["accuracy"]
    assert f"<small>95%: {lo:.3f}-{hi:.3f}</small>" in kpis(m)
    g = m["interval"]["recall_glioma"]
    assert f"<td>{g[0]:.3f}-{g[1]:.3f}</td>" in per_class(m, CLASSES)
    old = {k: v for k, v in m.items() if k != "interval"}  # a metrics.json from before intervals
    assert "<small>" not in kpis(old) and "<td>n/a</td>" in per_class(old, CLASSES)
