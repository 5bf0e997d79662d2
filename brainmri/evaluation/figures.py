"""Report figures as PNG bytes (matplotlib's object API on the Agg canvas: no pyplot global
state, no display, safe in any process) and Grad-CAM maps via the `grad-cam` package."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: never try to open a window

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ..core.metrics import SELECTION_METRIC  # noqa: E402
from ..data.transforms import to_model_input  # noqa: E402


def to_png(fig: Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # no Software tag: it carries matplotlib's URL, and the report is meant to hold none
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def confusion(cm: list, classes: list[str]) -> bytes:
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = Figure(figsize=(10, 4.4))
    for ax, m, title, fmt in zip(fig.subplots(1, 2), (cm, norm), ("counts", "row-normalised (recall)"),
                                 ("{:.0f}", "{:.2f}"), strict=True):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.6 else "black", fontsize=9)
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix, {title}")
    return to_png(fig)


def roc(labels: np.ndarray, probs: np.ndarray, classes: list[str], auc: dict) -> bytes:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    for i, c in enumerate(classes):
        pos = labels == i
        if 0 < pos.sum() < len(labels):
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            ax.plot(fpr, tpr, label=f"{c} (AUC {auc['per_class'][c]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one class vs rest")
    ax.legend(loc="lower right", fontsize=8)
    return to_png(fig)


def reliability(before: dict, after: dict, temperature: float) -> bytes:
    fig = Figure(figsize=(10, 4.4))
    edges = np.asarray(before["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    for ax, r, title in zip(fig.subplots(1, 2), (before, after),
                            ("uncalibrated (T = 1)", f"temperature scaled (T = {temperature:.3f})"),
                            strict=True):
        count = np.asarray(r["count"])
        acc = np.where(count > 0, r["accuracy"], 0)
        ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        ax.bar(centres, np.where(count > 0, np.asarray(r["confidence"]) - acc, 0), bottom=acc,
               width=width * 0.95, color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"Reliability, {title}: ECE {r['ece']:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    return to_png(fig)


def risk_coverage(rc: dict, chosen: dict | None) -> bytes:
    fig = Figure(figsize=(5.5, 4.4))
    ax = fig.subplots()
    ax.plot(rc["coverage"], rc["risk"], lw=1.5)
    if chosen and chosen["accuracy_covered"] is not None:
        ax.plot([chosen["coverage"]], [1 - chosen["accuracy_covered"]], "o", color="tab:red",
                label=f"abstain below {chosen['threshold']:.2f}: coverage {chosen['coverage']:.2f}")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (share answered, most confident first)")
    ax.set_ylabel("risk (error rate among answered)")
    ax.set_title(f"Risk-coverage (AURC {rc['aurc']:.3f})" if rc["aurc"] is not None else "Risk-coverage")
    return to_png(fig)


def gallery(images: list[np.ndarray], captions: list[str], title: str, cols: int = 6) -> bytes:
    n = max(1, len(images))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.1 * cols, 2.4 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, cap in zip(axes, images, captions, strict=False):  # the grid's spare cells stay empty
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(cap, fontsize=7)
    if not images:
        axes[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


def history(hist: list[dict]) -> bytes | None:
    if not hist:
        return None
    ep = [h.get("epoch", i) for i, h in enumerate(hist)]
    fig = Figure(figsize=(12, 3.6))
    panels = [("loss", ["train_loss", "val_loss"]), ("val accuracy", ["val_accuracy"]),
              ("val macro-F1", ["val_macro_f1"])]
    for ax, (title, keys) in zip(fig.subplots(1, 3), panels, strict=True):
        for k in keys:
            if all(k in h for h in hist):
                ax.plot(ep, [h[k] for h in hist], marker="o", ms=3, label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.legend(fontsize=8)
    return to_png(fig)


def search_plot(rows: list[dict], metric: str = SELECTION_METRIC) -> bytes:
    """A search's progress from its leaderboard rows: each trial's best `metric` (left) and
    its learning curve over training time (right), coloured by model family; x marks a trial
    ASHA stopped."""
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    families = sorted({r["model"] for r in rows})
    colours = {f: f"C{i}" for i, f in enumerate(families)}
    for r in sorted(rows, key=lambda r: r["trial"]):
        hist = r["history"]
        if not hist:
            continue
        t = [sum(h["epoch_seconds"] for h in hist[:i + 1]) / 60 for i in range(len(hist))]
        ax2.plot(t, [h[metric] for h in hist], color=colours[r["model"]], alpha=0.8,
                 marker="x" if r["status"] == "stopped by ASHA" else ".")
        ax1.scatter(int(r["trial"][1:4]), r["best_val_macro_f1"], color=colours[r["model"]],
                    marker="x" if r["status"] == "stopped by ASHA" else "o", s=40)
    for f in families:
        ax1.scatter([], [], color=colours[f], label=f)
    ax1.legend(fontsize=8, title="o finished, x stopped early", title_fontsize=8)
    ax1.set(xlabel="trial", ylabel=f"best {metric}", title="best validation macro-F1 per trial")
    ax2.set(xlabel="trial training time (min)", ylabel=metric, title="learning curves")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return to_png(fig)


# -- Grad-CAM -------------------------------------------------------------------------------------
def last_conv(model: torch.nn.Module) -> torch.nn.Module:
    """The last nn.Conv2d registered in the model: works for any CNN in the registry without
    naming layers (for brainnet it is the final stage's last convolution)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no Conv2d layer for Grad-CAM")
    return convs[-1]


def target_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers Grad-CAM reads: the last convolution, or for an ensemble (models.zoo.Ensemble)
    each member's. pytorch-grad-cam scales each layer's map to [0, 1] per image and averages
    them, so every member counts the same, and a member's share of the ensemble's
    probability (a positive factor on its gradients) cancels in that scaling."""
    from ..models.zoo import Ensemble

    if isinstance(model, Ensemble):
        return [last_conv(m) for m in model.members]
    return [last_conv(model)]


def gradcam_overlays(model: torch.nn.Module, x_u8: np.ndarray, targets: list[int]) -> list[np.ndarray]:
    """Grad-CAM for each image's target class -> RGB uint8 overlays on the model's input."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(x_u8) == 0:
        return []
    # the bare network: a flip-averaging wrapper would run the target layer twice, and the
    # map would follow the flipped pass (the decision's logit bias does not move the map)
    model = getattr(model, "net", model)
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(x_u8)))
    with GradCAM(model=model, target_layers=target_layers(model)) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    rgb = np.repeat(x_u8[..., None], 3, axis=-1).astype(np.float32) / 255.0
    return [show_cam_on_image(img, m, use_rgb=True, image_weight=0.55)
            for img, m in zip(rgb, maps, strict=True)]
