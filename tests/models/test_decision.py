"""The decision rule that travels with a model: flips, the glioma logit bias, and its choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmri.models.checkpoints import build_model, dump_state, load_state, make_checkpoint
from brainmri.models.decision import InferenceNet, choose_logit_bias, inference_record, wrap
from brainmri.models.zoo import create_model

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def test_bias_raises_glioma_recall_within_the_allowed_f1_cost():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    logits = rng.normal(0, 1, (200, 4))
    logits[np.arange(200), labels] += 2.0
    logits[:50, 0] -= 1.2  # glioma under-called, mostly as meningioma
    logits[:50, 1] += 0.6
    # max_accuracy_cost=1: the half-split check never refuses, so this is the fit itself
    bias, rec = choose_logit_bias(logits, labels, CLASSES, max_macro_f1_drop=0.01, max_accuracy_cost=1.0)
    assert rec["adopted"] and rec["after"] == rec["fitted"]
    assert bias[1:] == [0.0, 0.0, 0.0] and bias[0] > 0
    assert rec["after"]["recall"] > rec["before"]["recall"]
    assert rec["after"]["macro_f1"] >= rec["before"]["macro_f1"] - 0.01
    # the smallest bias reaching that recall: one step less recalls fewer gliomas (or costs too much F1)
    z = logits.copy()
    z[:, 0] += bias[0] - 0.05
    m = (z.argmax(1)[:50] == 0).mean()
    assert m < rec["after"]["recall"] or bias[0] == 0
    # no F1 may be spent: the bias may only stay or move where F1 does not drop
    bias0, rec0 = choose_logit_bias(logits, labels, CLASSES, max_macro_f1_drop=0.0, max_accuracy_cost=1.0)
    assert rec0["after"]["macro_f1"] >= rec0["before"]["macro_f1"]
    with pytest.raises(ValueError, match="not one of"):
        choose_logit_bias(logits, labels, CLASSES, target="astrocytoma")


def _model_logits(noise: float, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), n)
    logits = rng.normal(0, noise, (4 * n, 4))
    logits[np.arange(4 * n), labels] += 3.0
    return logits, labels


def test_a_bias_is_kept_only_if_it_holds_on_images_it_was_not_chosen_on():
    # a sure model: the few gliomas it misses sit near the boundary, and a bias chosen on one
    # half of the images recovers gliomas on the other half without costing accuracy
    bias, rec = choose_logit_bias(*_model_logits(1.0), CLASSES)
    assert rec["adopted"] and bias[0] == rec["fitted"]["bias"] > 0 and bias[1:] == [0.0] * 3
    assert rec["held_out"]["accuracy_change"] >= 0 and rec["held_out"]["recall_change"] > 0
    assert rec["held_out"]["splits"] == 100
    # a noisier model: the bias that looks free on all the images costs accuracy on a held-out
    # half, so the rule stays plain argmax and says what it refused
    bias, rec = choose_logit_bias(*_model_logits(1.5), CLASSES)
    assert rec["fitted"]["bias"] > 0 and rec["fitted"]["macro_f1"] >= rec["before"]["macro_f1"] - 0.005
    assert not rec["adopted"] and bias == [0.0] * 4 and rec["after"] == rec["before"]
    assert rec["held_out"]["accuracy_change"] < 0
    # ... unless that cost is allowed; and the check is deterministic (its halvings are seeded)
    kept, rec2 = choose_logit_bias(*_model_logits(1.5), CLASSES, max_accuracy_cost=0.05)
    assert rec2["adopted"] and kept[0] == rec["fitted"]["bias"]
    assert choose_logit_bias(*_model_logits(1.5), CLASSES)[1] == rec
    # nothing to check when no bias raises glioma recall
    labels = np.repeat(np.arange(4), 10)
    none, rec0 = choose_logit_bias(np.eye(4)[labels] * 5.0, labels, CLASSES)
    assert none == [0.0] * 4 and not rec0["adopted"] and rec0["held_out"]["splits"] == 0
    # a zero bias is no bias: the published record asks for flips only
    assert inference_record(True, bias, rec)["logit_bias"] is None


def test_the_check_holds_out_whole_duplicate_groups():
    """Ten near copies of one missed glioma (one duplicate group) pull the bias up; the same
    bias turns six borderline meningiomas (each its own scan) into glioma. Halves of images put
    copies on both sides, so the held-out half is 'rescued' by copies of what it was chosen
    on and the bias looks good; halves that keep the group whole show it costs accuracy."""
    rows, labels, groups = [], [], []

    def add(logit, label, group, n=1):
        rows.extend([logit] * n)
        labels.extend([label] * n)
        groups.extend([group] * n)

    add([0.0, 1.0, -4, -4], 0, "copies", n=10)  # the missed glioma, ten copies
    for i in range(6):
        add([0.0, 0.5, -4, -4], 1, f"m{i}")  # borderline meningiomas
    for c in range(4):
        for i in range(20):
            add(list(np.eye(4)[c] * 6.0), c, f"easy{c}-{i}")
    logits, labels, groups = np.array(rows), np.array(labels), np.array(groups)
    by_image = choose_logit_bias(logits, labels, CLASSES, max_macro_f1_drop=0.1)[1]
    by_group = choose_logit_bias(logits, labels, CLASSES, max_macro_f1_drop=0.1, groups=groups)[1]
    assert by_image["fitted"] == by_group["fitted"] and by_image["fitted"]["bias"] == 1.0
    assert by_image["held_out"]["halves"] == "images" and by_group["held_out"]["halves"] == "duplicate groups"
    assert by_image["held_out"]["accuracy_change"] > 0 and by_image["adopted"]
    assert by_group["held_out"]["accuracy_change"] < 0 and not by_group["adopted"]
    with pytest.raises(ValueError, match="groups has 3 rows"):
        choose_logit_bias(logits, labels, CLASSES, groups=groups[:3])
    # a group whose copies carry two labels (a near label conflict) still lands in one half
    from brainmri.models.decision import _stratified_halves

    mixed = groups.copy()
    mixed[labels == 1] = "copies"  # the meningiomas join the gliomas' group
    rng = np.random.default_rng(0)
    for _ in range(20):
        half = _stratified_halves(labels, rng, mixed)
        assert len(set(half[mixed == "copies"].tolist())) == 1
        for c in range(4):  # about half of each class's easy rows (whole groups of one image)
            easy = np.char.startswith(mixed.astype(str), f"easy{c}-")
            assert abs(half[easy].sum() - easy.sum() / 2) <= 10


def test_inference_net_averages_flips_and_adds_the_bias():
    torch.manual_seed(0)
    net = create_model("brainnet", 4, 1, image_size=32, width=8).eval()
    x = torch.randn(3, 1, 32, 32)
    plain = net(x)
    assert wrap(net, None) is net and wrap(net, inference_record(False)) is net
    flip = InferenceNet(net, tta=True)(x)
    assert torch.allclose(flip, (plain + net(torch.flip(x, dims=[3]))) / 2, atol=1e-6)
    bias = InferenceNet(net, tta=False, logit_bias=[0.5, 0, 0, 0])(x)
    assert torch.allclose(bias - plain, torch.tensor([0.5, 0, 0, 0]).expand_as(plain), atol=1e-6)


def test_the_rule_is_part_of_the_checkpoint_and_old_checkpoints_stay_plain():
    net = create_model("brainnet", 4, 1, image_size=32, width=8)
    common = dict(epoch=0, best=0.0, bad_epochs=0, history=[], resumes=[], classes=CLASSES,
                  dataset={"uri": "x"}, params=1)
    cfg = {"model": "brainnet", "image_size": 32, "model_args": {"width": 8}, "tta": True}
    state = load_state(dump_state(make_checkpoint(net.state_dict(), config=cfg, **common,
                                                  inference=inference_record(True, [1.0, 0, 0, 0]))))
    model = build_model(state)
    assert isinstance(model, InferenceNet) and model.tta and not model.training
    assert isinstance(build_model(state, bare=True), type(net))
    # the config's tta alone (no rule chosen) is recorded by default
    assert make_checkpoint(net.state_dict(), config=cfg, **common)["inference"]["tta"] is True
    old = {k: v for k, v in state.items() if k != "inference"}  # written before the rule existed
    assert isinstance(build_model(old), type(net))


def test_exports_carry_the_decision_rule(tmp_path):
    """A published model with flips and a bias: TorchScript and ONNX give the wrapped
    network's logits, so a user without this package applies the same rule."""
    from brainmri.core.storage import open_location
    from brainmri.evaluation.inference import load_network, open_model
    from brainmri.models.checkpoints import publish_model

    torch.manual_seed(1)
    net = create_model("brainnet", 4, 1, image_size=32, width=8)
    cfg = {"model": "brainnet", "image_size": 32, "model_args": {"width": 8}, "tta": True}
    state = make_checkpoint(net.state_dict(), config=cfg, epoch=0, best=0.0, bad_epochs=0, history=[],
                            resumes=[], classes=CLASSES, dataset={"uri": "x"}, params=1,
                            inference=inference_record(True, [0.7, 0, 0, 0]))
    uri = publish_model(open_location(str(tmp_path)), "brainnet", state, {"val_macro_f1": 0.5}).uri
    ref = open_model(uri)
    x = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        want = build_model(state)(x)
        bare = build_model(state, bare=True)(x)
    assert not torch.allclose(want, bare, atol=1e-3)  # the rule changes the logits
    for runtime, tol in (("torchscript", 1e-4), ("onnx", 1e-3)):
        net_rt = load_network(*ref.runtime_file(runtime), runtime=runtime)
        with torch.no_grad():
            got = torch.as_tensor(np.asarray(net_rt(x)))
        assert torch.allclose(got, want, atol=tol), runtime


def test_every_bias_is_scored_as_core_metrics_scores_it_to_the_bit():
    """The choice scores all BIAS_GRID rules at once; each score is from_confusion's, exactly
    (an absent class included), so the choice is the one the metrics schema would make."""
    from brainmri.core.metrics import confusion, from_confusion, key
    from brainmri.models.decision import BIAS_GRID, _predictions, _scores

    rng = np.random.default_rng(3)
    for n, absent in ((37, None), (120, 3), (9, 0)):
        labels = rng.integers(0, 4, n)
        if absent is not None:
            labels[labels == absent] = (absent + 1) % 4
        logits = rng.normal(0, 1.5, (n, 4))
        logits[np.arange(n), labels] += 1.0
        for t in (0, 2):
            preds = _predictions(logits, t)
            scores = _scores(preds, labels, CLASSES, t)
            assert [s["bias"] for s in scores] == BIAS_GRID.tolist()
            for s, p in zip(scores, preds, strict=True):
                m = from_confusion(confusion(labels, p, 4), CLASSES)
                assert (s["macro_f1"], s["accuracy"], s["recall"]) == (
                    m["macro_f1"], m["accuracy"], m[key("recall", CLASSES[t])])
