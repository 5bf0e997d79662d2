"""The evaluation report's model card says which decision rule the scores came from."""

from __future__ import annotations

from brainmri.evaluation.report import card_section

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
