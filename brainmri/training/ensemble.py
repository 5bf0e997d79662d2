"""Several trained models published as one (`brainmri ensemble`).

The members' class probabilities are averaged (models.zoo.Ensemble); the result is
published like any trained model (model.pt, the TorchScript and ONNX exports, metadata.json
with its card), so evaluate, predict, serving and retrain need nothing new. Why: seeds of one
recipe disagree on a few percent of the hard images, and averaging them is the cheapest
accuracy there is once the members exist -- on a cluster they train side by side. The cost
is k forward passes per image.

What members must share, checked before anything is written (one line says which member
differs): classes, input size, dataset version and validation rows (the ensemble is scored
and its decision rule chosen on those rows, which must be unseen by every member) and
test-time flips. Each member's own glioma bias is dropped: the rule is chosen again, for the
ensemble, on the same validation rows, by the same code as after training
(finalize.publish_network), with the allowances of the members' recipe.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from ..config import ConfigError, EnsembleConfig, TrainConfig, from_dict
from ..core import metrics as M
from ..core.storage import open_location
from ..data.datasets import resolve_dataset
from ..models.checkpoints import epoch_score, load_state, make_checkpoint, model_file
from ..models.decision import inference_record
from .finalize import publish_network, validation_logits


@dataclass
class Member:
    uri: str  # the file its weights were read from (a version's model.pt, or a checkpoint)
    sha256: str  # of that file
    state: dict

    def setting(self, key: str):
        """A recipe value as the member was trained (TrainConfig's default when its config
        predates the key)."""
        return self.state["config"].get(key, getattr(TrainConfig, key))

    @property
    def best(self) -> float:
        return epoch_score(self.state)


@dataclass
class EnsembleResult:
    model_uri: str
    metrics: dict  # the ensemble on the validation rows (training-history keys, val_ prefixed)
    members: list[dict]
    seconds: float


def _weights_digest(state: dict) -> str:
    """sha256 of the weights alone: a version's model.pt and its run's checkpoint.pt differ
    as files but are the same network."""
    h = hashlib.sha256()
    for k in sorted(state["model"]):
        h.update(k.encode())
        h.update(state["model"][k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_members(uris: list[str]) -> list[Member]:
    if len(uris) < 2:
        raise ConfigError(f"an ensemble needs at least two models, got {len(uris)}")
    out = []
    for uri in uris:
        loc = model_file(uri)
        blob = loc.read_bytes()
        out.append(Member(loc.uri, hashlib.sha256(blob).hexdigest(), load_state(blob)))
    digests = [_weights_digest(m.state) for m in out]
    for i, d in enumerate(digests):
        if d in digests[:i]:
            raise ConfigError(f"{out[i].uri} holds the same weights as {out[digests.index(d)].uri}: "
                              "listed twice, an ensemble of copies only repeats it")
    return out


def _shared(members: list[Member], what: str, get) -> None:
    first = get(members[0])
    for m in members[1:]:
        if get(m) != first:
            raise ConfigError(f"ensemble members must share their {what}: {m.uri} has {get(m)!r}, "
                              f"{members[0].uri} has {first!r}")


def check_members(members: list[Member]) -> None:
    """Everything the ensemble's input contract and its validation score rely on."""
    for m in members:  # first: a nested ensemble would otherwise fail on a less telling check
        if m.state["config"]["model"] == "ensemble":
            raise ConfigError(f"{m.uri} is an ensemble already: list its members instead")
    _shared(members, "classes", lambda m: list(m.state["classes"]))
    _shared(members, "input (preprocess)", lambda m: m.state["preprocess"])
    _shared(members, "dataset version", lambda m: (m.state["dataset"].get("uri"),
                                                   m.state["dataset"].get("manifest_hash")))
    _shared(members, "validation rows (limit_val)", lambda m: m.setting("limit_val"))
    _shared(members, "test-time flips (tta)", lambda m: bool((m.state.get("inference") or {}).get("tta")))
    for key in ("decision_max_f1_drop", "decision_max_accuracy_cost"):  # the rule's allowances
        _shared(members, key, lambda m, key=key: m.setting(key))


def ensemble_state(members: list[Member], cfg: EnsembleConfig) -> dict:
    """The checkpoint dict of the ensemble (no decision rule yet): the first member's recipe
    with the model replaced, the members' weights under members.<i>., and where each came from."""
    base = members[0].state
    config = {**base["config"], "model": "ensemble", "name": cfg.name, "out": cfg.out,
              "decision_rule": cfg.decision_rule, "pretrained": "", "teacher": "",  # each member's own
              "model_args": {"members": [{"model": m.state["config"]["model"],
                                          "model_args": m.state["config"].get("model_args", {})}
                                         for m in members]}}
    weights = {f"members.{i}.{k}": v for i, m in enumerate(members) for k, v in m.state["model"].items()}
    record = [{"uri": m.uri, "sha256": m.sha256, "model": m.state["config"]["model"],
               "seed": m.state["config"].get("seed"), "epoch": m.state.get("epoch"),
               "best_val_macro_f1": m.best,
               "teacher_sha256": (m.state.get("distillation") or {}).get("sha256")} for m in members]
    state = make_checkpoint(weights, epoch=0, best=0.0, bad_epochs=0, history=[], resumes=[],
                            config=config, classes=list(base["classes"]), dataset=dict(base["dataset"]),
                            params=sum(m.state["params"] for m in members),  # each recorded its own
                            inference=inference_record(config.get("tta", False)))
    state["preprocess"] = base["preprocess"]  # what every member was checked to share
    state["ensemble"] = {"members": record}
    return state


def combine(uris: list[str], cfg: EnsembleConfig) -> EnsembleResult:
    t0 = time.time()
    out = open_location(cfg.out, check=True)  # an unreachable bucket fails now, not after scoring
    members = load_members(uris)
    check_members(members)
    state = ensemble_state(members, cfg)
    tcfg = from_dict(TrainConfig, state["config"])
    version, manifest = resolve_dataset(state["dataset"]["uri"])
    logits, labels = validation_logits(tcfg, state, version, manifest)
    classes = list(state["classes"])
    vm = M.from_confusion(M.confusion(labels, logits.argmax(1), len(classes)), classes)
    metrics = {"epoch": 0, **{f"val_{k}": v for k, v in vm.items()}}
    state["best"] = metrics[M.SELECTION_METRIC]
    dest = publish_network(tcfg, state, metrics, out, name=cfg.name, scored=(logits, labels))
    return EnsembleResult(dest.uri, metrics, state["ensemble"]["members"], time.time() - t0)

