"""report.html: one self-contained page (inline CSS, figures as base64 data URIs, no
scripts, no external references), readable offline and safe to attach to a ticket; and a
search's leaderboard as CSV, Markdown and such a page (`render_leaderboard`)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json

from ..core import metrics as M

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;
color:#1d2329;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #d0d7de;padding:.25em .6em;text-align:right}
th{background:#f3f5f7}td:first-child,th:first-child{text-align:left}table.kv td{text-align:left}
.kpi{display:inline-block;margin:.3em 1.2em .3em 0;padding:.5em .9em;border-radius:6px;background:#f3f5f7}
.kpi b{display:block;font-size:1.4em}.note{color:#57606a;font-size:.92em}
.warn{background:#fff4e5;border-left:4px solid #d97706;padding:.5em .9em}
img{max-width:100%;border:1px solid #e5e7eb;margin:.4em 0}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}
"""


def e(x) -> str:
    return html.escape(str(x))


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return e(v)


def img(png: bytes | None, alt: str) -> str:
    if not png:
        return f"<p class='note'>({e(alt)}: not available)</p>"
    return f"<img alt='{e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def kpis(m: dict) -> str:
    keys = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
            ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1"), ("log_loss", "log loss"),
            ("brier", "Brier"), ("ece", "ECE (15 bins)")]
    auc = (m.get("roc_auc_ovr") or {}).get("macro")
    items = [(k, label, m.get(k)) for k, label in keys] + [("", "ROC-AUC (OvR, macro)", auc)]
    ci = m.get("interval") or {}

    def span(k: str) -> str:  # the bootstrap interval under the figure, where there is one
        r = ci.get(k)
        return f"<small>{ci['level']:.0%}: {r[0]:.3f}-{r[1]:.3f}</small>" if r else ""

    return "".join(f"<span class='kpi'>{e(label)}<b>{fmt(v, 3)}</b>{span(k)}</span>" for k, label, v in items)


def per_class(m: dict, classes: list[str]) -> str:
    auc = (m.get("roc_auc_ovr") or {}).get("per_class", {})
    ci = m.get("interval") or {}

    def recall_range(c: str) -> str:
        r = ci.get(M.key("recall", c))
        return f"{r[0]:.3f}-{r[1]:.3f}" if r else "n/a"

    rows = [[c, v["precision"], v["recall"], recall_range(c), v["f1"], v["support"], auc.get(c)]
            for c, v in M.per_class(m, classes).items()] if m.get("n") else []
    level = f"{ci['level']:.0%} interval" if ci else "interval"
    return table(["class", "precision", "recall", f"recall, {level}", "F1", "support", "ROC-AUC (OvR)"], rows)


def metric_compare(all_m: dict, clean: dict | None) -> str:
    keys = ["n", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "log_loss", "brier", "ece"]
    if not clean:
        return table(["metric", "all images"], [[k, all_m.get(k)] for k in keys])
    return table(["metric", "all images", "training duplicates removed"],
                 [[k, all_m.get(k), clean.get(k)] for k in keys])


def model_table(mod: dict) -> str:
    ds = mod.get("training_dataset") or {}
    best = mod.get("best_validation") or {}
    rows = [("name / version", f"{mod['name']} / {mod['version']}"), ("weights", mod["weights"]),
            ("sha256", mod["sha256"]), ("classes", ", ".join(mod["classes"])),
            ("input", f"{mod['image_size']} px greyscale"), ("parameters", mod.get("params")),
            ("training dataset", f"{ds.get('name')} version {ds.get('version')} at {ds.get('uri')}"),
            ("published", mod.get("created_at"))]
    run = mod.get("runtime") or {}
    if run.get("runtime", "torch") != "torch":
        rows.insert(2, ("runtime", f"{run['runtime']}: {run['file']} (sha256 {run['sha256']})"))
    if best:
        rows.append(("best validation epoch", ", ".join(
            f"{k} {fmt(best.get(k), 4)}" for k in ("epoch", "val_accuracy", "val_macro_f1", "val_loss")
            if k in best)))
    body = "".join(f"<tr><th>{e(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def card_section(mod: dict, allm: dict, clean: dict | None) -> str:
    """The model card (metadata.json's `card`), with this evaluation's own per-class figures as
    its known weaknesses (weakest recall first)."""
    from ..models.card import INTENDED_USE, LEAKAGE_CAVEAT, NOT_FOR, weaknesses

    card = mod.get("card") or {}
    data = card.get("training_data") or {}
    counts = data.get("rows")
    weak = weaknesses(clean or allm, mod["classes"]) if allm.get("n") else []
    dec = mod.get("decision") or {}
    rule = "plain argmax"
    if dec.get("logit_bias") and any(dec["logit_bias"]):
        rule = "logit bias " + ", ".join(f"{c} {b:+.2f}" for c, b in zip(mod["classes"], dec["logit_bias"],
                                                                          strict=False) if b)
    chosen = dec.get("decision") or {}
    if chosen.get("adopted") is False and chosen.get("fitted", {}).get("bias"):
        rule += (f" (a {chosen['target']} logit bias of {chosen['fitted']['bias']:+.2f} fitted on validation "
                 "was not kept: chosen on half the validation images, it cost "
                 f"{-chosen['held_out']['accuracy_change']:.4f} accuracy on the other half)")
    rule += " + left-right flip averaging" if dec.get("tta") else ""
    parts = ["<h2>Model card</h2>",
             f"<p><b>Intended use.</b> {e(card.get('intended_use', INTENDED_USE))}</p>",
             "<p><b>Not for:</b></p><ul>" + "".join(f"<li>{e(x)}</li>" for x in card.get("not_for", NOT_FOR))
             + "</ul>",
             f"<p><b>Training data.</b> {e(data.get('name'))} version {e(data.get('version'))}"
             + (f": rows {e(counts)}, exact duplicates dropped {e(data.get('exact_duplicates_dropped'))}, "
                f"near-duplicate groups kept in one split {e(data.get('near_duplicate_groups'))}, "
                f"label conflicts excluded {e(data.get('label_conflicts'))}" if counts else "")
             + ".</p>",
             f"<p><b>Decision rule.</b> {e(rule)}.</p>",
             f"<p><b>Leakage.</b> {e(LEAKAGE_CAVEAT)}</p>",
             "<p><b>Known weaknesses</b> (this evaluation"
             + (", training duplicates removed" if clean else "") + ", weakest recall first):</p>",
             table(["class", "recall", "precision"],
                   [[w["class"], w["recall"], w["precision"]] for w in weak])]
    return "\n".join(parts)


def render(m: dict, figs: dict[str, bytes | None], model_config: dict) -> str:
    """The whole page from metrics.json's content plus the figures."""
    mod, data, counts = m["model"], m["data"], m["counts"]
    cal, leak, sel = m["calibration"], m["leakage"], m["selective"]
    allm = m["metrics"]["all"]
    clean = m["metrics"].get("without_training_duplicates")
    parts = [f"<h1>Evaluation: {e(mod['name'])} / {e(mod['version'])}</h1>",
             f"<p class='note'>on {e(data.get('kind'))} <code>{e(data.get('uri'))}</code>"
             + (f", split <b>{e(data['split'])}</b>" if data.get("split") else "")
             + f" &middot; data id <code>{e(m['data_id'])}</code> &middot; {e(m['created_at'])}</p>",
             kpis(allm), card_section(mod, allm, clean)]

    parts.append("<h2>Images</h2>")
    rej = counts["rejected_by_reason"]
    parts.append(f"<p>{counts['files']} files: <b>{counts['evaluated']}</b> evaluated, "
                 f"<b>{counts['rejected']}</b> rejected by ingest's rules.</p>")
    if rej:
        parts.append(table(["rejection reason", "files"], [[k, v] for k, v in rej.items()]))

    parts.append("<h2>Per class</h2>" + per_class(allm, mod["classes"]))
    parts.append(img(figs.get("confusion"), "confusion matrix"))
    parts.append(img(figs.get("roc"), "ROC curves"))

    parts.append("<h2>Leakage check against the training data</h2>")
    if leak.get("available"):
        parts.append(
            f"<p>Compared with splits {e(', '.join(leak['compared_with_splits']))} of the training "
            f"dataset <code>{e(leak['training_dataset'])}</code> ({leak['training_images']} images): "
            f"<b>{leak['exact_duplicates']}</b> exact duplicates (same sha256), "
            f"<b>{leak['near_duplicates']}</b> near duplicates (pHash distance &le; "
            f"{leak['near_duplicate_max_phash_distance']}"
            f"{', to an image or its mirror' if leak.get('mirrors_compared') else ''}); "
            f"<b>{leak['removed']}</b> removed below.</p>")
        if leak["removed"]:
            parts.append("<p class='warn'>Some evaluated images were (nearly) seen in training: "
                         "prefer the de-duplicated column.</p>")
    else:
        parts.append(f"<p class='warn'>Not checked: {e(leak.get('error', 'unknown'))}</p>")
    parts.append(metric_compare(allm, clean))

    parts.append("<h2>Calibration</h2>")
    parts.append(f"<p>Temperature <b>T = {cal['temperature']:.4f}</b> ({e(cal['source'])}). "
                 f"ECE on these images: {fmt(allm.get('ece_uncalibrated'))} before, "
                 f"{fmt(allm.get('ece'))} after; log loss {fmt(allm.get('log_loss_uncalibrated'))} "
                 f"&rarr; {fmt(allm.get('log_loss'))}.</p>")
    if cal.get("fit"):
        f = cal["fit"]
        parts.append(f"<p class='note'>Fit on {f['n']} validation images: NLL {f['nll_before']:.4f} "
                     f"&rarr; {f['nll_after']:.4f}, ECE {f['ece_before']:.4f} "
                     f"&rarr; {f['ece_after']:.4f}.</p>")
    parts.append(img(figs.get("reliability"), "reliability diagram"))

    parts.append("<h2>Abstention (selective prediction)</h2>")
    ch = sel.get("chosen")
    if ch:
        parts.append(f"<p>Abstaining below confidence <b>{ch['threshold']:.2f}</b>: "
                     f"<b>{ch['referred']}</b> images flagged <i>refer to a radiologist</i> "
                     f"(kept in predictions.parquet, not hidden); coverage {ch['coverage']:.3f}, "
                     f"accuracy on the rest {fmt(ch['accuracy_covered'])} vs {fmt(ch['accuracy_all'])} "
                     "on all.</p>")
    parts.append(table(["abstain below", "coverage", "referred", "accuracy answered"],
                       [[t["threshold"], t["coverage"], t["referred"], t["accuracy_covered"]]
                        for t in sel["table"]]))
    parts.append(img(figs.get("risk_coverage"), "risk-coverage curve"))

    parts.append("<h2>Most confident mistakes</h2>" + img(figs.get("mistakes"), "mistakes gallery"))
    parts.append("<h2>Grad-CAM</h2><p class='note'>Grad-CAM (grad-cam package) on the last "
                 "convolution of the network, for the predicted class; the model's input (after "
                 "deterministic preprocessing) beside the overlay.</p>"
                 + img(figs.get("gradcam"), "Grad-CAM overlays"))

    parts.append("<h2>Training history</h2>" + img(figs.get("history"), "training history"))
    parts.append("<h2>Model</h2>" + model_table(mod))
    parts.append("<pre>" + e(json.dumps(model_config, indent=2, sort_keys=True, default=str)) + "</pre>")
    parts.append("<h2>Data</h2><pre>" + e(json.dumps(data, indent=2, sort_keys=True, default=str))
                 + "</pre>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{e(mod['name'])} {e(mod['version'])}: evaluation</title><style>{CSS}</style>"
            f"</head><body>{body}</body></html>\n")


# -- a search's leaderboard --------------------------------------------------------------------
LEADERBOARD_COLUMNS = ["rank", "trial", "model", "status", "best_val_macro_f1", "val_accuracy",
                       "val_recall_glioma", "best_epoch", "epochs_run", "wall_s", "params", "gflops",
                       "config", "run_uri", "error"]
SHORT_COLUMNS = LEADERBOARD_COLUMNS[:12]  # Markdown and HTML; each row's config follows


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def render_leaderboard(rows: list[dict], name: str, metric: str, search_note: str,
                       plot: bytes | None) -> dict[str, bytes]:
    """A search's leaderboard (rows best first, keyed by LEADERBOARD_COLUMNS; the winner's
    `model_uri`/`report_uri` linked when set) -> {file name: bytes} for leaderboard.csv, .md
    and .html. `search_note` describes the search in the Markdown page; `plot` goes in the
    HTML page."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(LEADERBOARD_COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in LEADERBOARD_COLUMNS])

    short = SHORT_COLUMNS
    winner = rows[0] if rows and rows[0].get("model_uri") else None
    md = [f"# Search {name}", "", f"{len(rows)} trials, metric {metric} (validation), {search_note}", "",
          "| " + " | ".join(short + ["config"]) + " |", "|" + "---|" * (len(short) + 1)]
    md += ["| " + " | ".join(_cell(r.get(c)) for c in short) + f" | `{r['config']}` |" for r in rows]
    if winner:
        md += ["", f"Winner published as `{winner['model_uri']}`"
               + (f"; test report `{winner['report_uri']}/report.html`" if winner.get("report_uri") else "")]

    links = ""
    if winner:
        links = f"<p>Winner: <code>{e(winner['model_uri'])}</code>"
        if winner.get("report_uri"):
            links += f" — <a href='{e(winner['report_uri'])}/report.html'>test report</a>"
        links += "</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(name)}</title>"
            f"<style>{CSS}</style></head><body><h1>Search {e(name)}</h1>"
            f"<p class='note'>{len(rows)} trials; metric {metric} on validation; best first.</p>"
            f"{links}{table(short + ['config'], [[r.get(c) for c in short] + [r['config']] for r in rows])}"
            f"{img(plot, 'search progress')}</body></html>")
    return {"leaderboard.csv": buf.getvalue().encode(),
            "leaderboard.md": ("\n".join(md) + "\n").encode(),
            "leaderboard.html": page.encode()}
