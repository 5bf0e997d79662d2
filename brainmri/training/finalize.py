"""The one finishing step of every run that publishes a network.

    run folder (runs/<name>/: checkpoint_*/, history.json, config.json)
      -> the best checkpoint by validation macro-F1 at the epoch its weights hold
      -> the whole run's history on it (a checkpoint's own stops at its epoch)
      -> the decision rule, chosen on the validation rows training saw (decision_rule)
      -> publish_model: model.pt, the verified exports, the card, metadata.json last

`brainmri train`, tune's winner and retrain's challenger (which is a `brainmri train` run)
all go through `finalize`; `brainmri ensemble`, whose network is no run, goes through the
same `publish_network`. So a recipe published by any of them is served the same way: a tuned
winner gets the glioma rule its recipe asks for, exactly as `brainmri train` gives it.

Calibration is not part of this step on purpose: its file (calibration.json) is tied to the
published weights' sha256 and fitted by `brainmri calibrate` or by evaluate, which score the
runtime they run (torch, TorchScript or ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, from_dict
from ..core.storage import Location, open_location
from ..data.datasets import resolve_dataset, split_arrays, split_column
from ..data.transforms import to_model_input
from ..models.checkpoints import CKPT_FILE, build_model, epoch_score, load_state, publish_model
from ..models.decision import choose_logit_bias, inference_record


@dataclass
class Finished:
    model_uri: str
    state: dict  # the published checkpoint dict (weights, config, inference, history)
    best: dict  # the history row of the best epoch (the metrics published with the model)


# -- the run's best checkpoint ----------------------------------------------------------------
def best_checkpoint(run: Location) -> tuple[dict, list]:
    """(the checkpoint dict in `run` with the best validation macro-F1 at its own epoch, the
    longest history any of its checkpoints holds). Ray keeps the top-k by that score and the
    latest; an earlier epoch wins a tie."""
    chosen, score, longest = None, -np.inf, []
    for d in sorted(run.listdir()):
        if d.startswith("checkpoint_") and (run / d / CKPT_FILE).exists():
            state = load_state((run / d / CKPT_FILE).read_bytes())
            longest = max(longest, state.get("history") or [], key=len)
            if epoch_score(state) > score:
                chosen, score = state, epoch_score(state)
    if chosen is None:
        raise ConfigError(f"run {run.uri} left no checkpoint to publish")
    return chosen, longest


# -- the decision rule ------------------------------------------------------------------------
@torch.no_grad()
def validation_logits(cfg: TrainConfig, state: dict, version, manifest: dict
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the validation rows training saw, for a checkpoint as it will be
    served with its flips but before any decision rule. One process: a few hundred images."""
    net = build_model({**state, "inference": inference_record(cfg.tta)})
    logits, labels = [], []
    for x, y in split_arrays(version, manifest, "val", cfg.image_size, cfg.limit_val):
        logits.append(net(to_model_input(torch.from_numpy(x))).float().numpy())
        labels.append(y)
    if not labels:
        raise ConfigError("no validation rows to score the model on (and to choose its decision rule on)")
    return np.concatenate(logits), np.concatenate(labels)


def choose_decision(cfg: TrainConfig, state: dict, version, manifest: dict,
                    scored: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The decision rule, chosen on the validation rows training saw, for the network as it
    will be served (with its flips): the glioma logit bias (models.decision.choose_logit_bias),
    or plain argmax when cfg.decision_rule says so. `scored`: validation_logits already computed."""
    if cfg.decision_rule == "argmax":
        return inference_record(cfg.tta)
    logits, labels = scored or validation_logits(cfg, state, version, manifest)
    groups = split_column(version, manifest, "val", "group", cfg.limit_val)  # halves keep them whole
    bias, chosen = choose_logit_bias(logits, labels, state["classes"], "glioma",
                                     cfg.decision_max_f1_drop, cfg.decision_max_accuracy_cost,
                                     groups=groups)
    fit, check = chosen["fitted"], chosen["held_out"]
    checked = (f"chosen on half of them (by {check['halves']}), accuracy on the other half "
               f"{check['accuracy_change']:+.4f}: "
               + ("kept" if chosen["adopted"] else "not kept, plain argmax")) if fit["bias"] else \
        "no bias raises glioma recall: plain argmax"
    print(f"brainmri: decision rule {chosen['rule']} = {fit['bias']:+.2f} on {chosen['n']} validation "
          f"images (glioma recall {chosen['before']['recall']:.4f} -> {fit['recall']:.4f}, macro-F1 "
          f"{chosen['before']['macro_f1']:.4f} -> {fit['macro_f1']:.4f}); {checked}")
    return inference_record(cfg.tta, bias, chosen)


# -- publishing -------------------------------------------------------------------------------
def publish_network(cfg: TrainConfig, state: dict, metrics: dict, out: Location, *, name: str,
                    stage: str = "released", scored: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> Location:
    """Decision rule (cfg's, on the dataset version the state records), then publish_model
    (weights, exports, card, metadata.json last) -> the version folder. `state` is changed in
    place: it is what was published."""
    version, manifest = resolve_dataset(state["dataset"]["uri"])  # exactly the version trained on
    state["inference"] = choose_decision(cfg, state, version, manifest, scored)
    return publish_model(out, name, state, metrics, stage=stage)


def finalize(run: Location, out: Location | str, *, stage: str = "released",
             record: dict | None = None) -> Finished:
    """Publish the best network of a finished training run (see the module docstring).
    `record`: extra keys for the published state (tune's {"tune": {experiment, trial}})."""
    out = open_location(out) if isinstance(out, str) else out
    state, latest = best_checkpoint(run)
    own = state["history"][-1]  # the row of the epoch its weights hold
    history = (run / "history.json").read_json() if (run / "history.json").exists() else []
    if len(latest) > len(history):  # history.json lags the last checkpoint (a crash between them)
        history = latest
    # the published model carries the whole run's curves, and the metrics of its own epoch
    state["history"] = history
    best = next((h for h in reversed(history) if h.get("epoch") == state["epoch"]), own)
    state.update(record or {})
    cfg = from_dict(TrainConfig, state["config"])
    dest = publish_network(cfg, state, best, out, name=cfg.model, stage=stage)
    return Finished(dest.uri, state, best)
