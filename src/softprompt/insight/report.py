"""Pages for people: the model card in each adapter folder and the self-contained HTML report.

The report puts side by side what tuning did: each adapter's config and loss curves, the loss
matrix of base model and adapters on every dataset, generations before and after, the nearest
vocabulary tokens of every virtual token, and checksums showing the base model is unchanged.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .plots import plot_heatmap, plot_losses, png_data_uri

if TYPE_CHECKING:
    from ..data import Texts
    from ..engine import SamplingParams
    from ..prompt import SoftPromptModel
    from .compare import Comparison
    from .evaluate import EvalResult
    from .scoring import TaskResult


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself: config, training record, loss log."""

    name: str
    folder: Path
    config: dict[str, Any]
    training: dict[str, Any]
    log: dict[str, Any]

    @classmethod
    def read(cls, name: str, folder: Path) -> AdapterInfo:
        def load(file: str) -> dict[str, Any]:
            path = folder / file
            try:
                value = json.loads(path.read_bytes()) if path.is_file() else {}
            except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: unknown
                value = {}
            return value if isinstance(value, dict) else {}

        return cls(
            name,
            folder,
            load("adapter_config.json"),
            load("training_config.json"),
            _clean_log(load("loss_log.json")),
        )

    def heldout_source(self) -> str | None:
        """The held-out data this adapter was evaluated on, as a loadable source, if known."""
        from ..tuning.config import HELDOUT_FILE

        recorded = self.training.get("eval_data")
        if recorded == HELDOUT_FILE and (self.folder / HELDOUT_FILE).is_file():
            return str(self.folder / HELDOUT_FILE)
        if isinstance(recorded, str) and (
            recorded.startswith("examples:") or Path(recorded).exists()
        ):
            return recorded
        return None

    def owns(self, data: str) -> bool:
        """Whether ``data`` is this adapter's own domain (its training or held-out data)."""
        from ..data import heldout_source

        own = {self.training.get("data"), self.training.get("eval_data"), self.heldout_source()}
        own.add(heldout_source(str(self.training.get("data") or "")))
        return data in own - {None}


def build_report(
    spm: SoftPromptModel,
    adapters: list[AdapterInfo],
    datasets: list[Texts],
    prompts: list[str],
    params: SamplingParams,
    max_length: int | None = None,
    batch_size: int = 16,
    matrix: list[list[EvalResult]] | None = None,
    comparisons: list[Comparison] | None = None,
    tasks: list[TaskResult] | None = None,
) -> str:
    """The whole report as one self-contained HTML page (images inlined as data URIs).

    ``matrix`` (rows: base model then adapters; columns: datasets) and ``comparisons`` may be
    passed when already computed; otherwise they are computed here. ``tasks`` (task metrics of
    the baselines and adapters, ``scoring``) add a task section.
    """
    from .compare import compare
    from .inspection import inspect_adapter

    names = [a.name for a in adapters]
    if matrix is None:
        matrix = eval_matrix(spm, names, datasets, max_length, batch_size)
    if comparisons is None:
        comparisons = compare(spm, prompts, names, params)
    checksum = spm.base_checksum()
    parts = [
        _HEAD,
        "<h1>softprompt report</h1>",
        f"<p class=meta>Base model <code>{escape(spm.base.name)}</code>, "
        f"{len(adapters)} adapter(s), {len(datasets)} dataset(s). Written "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.</p>",
        _preservation(adapters, checksum, matrix[0]),
        _task_section(tasks) if tasks else "",
        _eval_section(adapters, datasets, matrix),
        _generations(comparisons),
        "<h2>Adapters</h2>",
    ]
    for info in adapters:
        adapter = spm.adapters[info.name]
        if adapter.method == "prefix":
            from .inspection import inspect_prefix

            parts.append(_adapter_section(spm, info, inspect_prefix(spm, adapter)))
        else:
            parts.append(_adapter_section(spm, info, inspect_adapter(spm, adapter)))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def eval_matrix(
    spm: SoftPromptModel,
    names: list[str],
    datasets: list[Texts],
    max_length: int | None,
    batch_size: int = 16,
) -> list[list[EvalResult]]:
    """Loss of the base model (first row) and each adapter on each dataset."""
    from .evaluate import evaluate

    return [
        [evaluate(spm, d.examples, m, d.source, batch_size, max_length) for d in datasets]
        for m in [None, *names]
    ]


GENERATOR_META = '<meta name=generator content="softprompt report">'
"""Marks a page as softprompt's, so a later report may replace it without --overwrite."""


def write_report(html: str, output: Path) -> None:
    """Write ``html`` to ``output`` through a temporary file, so no half page is ever left."""
    from ..files import write_text

    try:
        write_text(output, html)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from exc


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page softprompt wrote (its generator tag is in the head)."""
    try:
        with path.open("rb") as handle:
            return GENERATOR_META.encode() in handle.read(2048)
    except OSError:
        return False


def check_writable(output: Path, overwrite: bool = False) -> None:
    """Fail before the slow work when ``output`` cannot be written or is a user's own file.

    Raises:
        UserError: it is a folder, its folder is missing or not writable, or it is an existing
            file that softprompt did not write (unless ``overwrite``).
    """
    if output.is_dir():
        raise UserError(f"{output} is a folder; give a file name such as report.html")
    parent = output.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {output}: folder {parent} is not writable")
    if output.exists() and not overwrite and not is_report(output):
        raise UserError(
            f"{output} exists and is not a softprompt report; pass --overwrite to replace it"
        )


def _clean_log(log: dict[str, Any]) -> dict[str, Any]:
    """The parts of a loss log the report can use; anything of the wrong shape is left out."""

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def records(key: str, fields: tuple[str, ...]) -> list[dict[str, Any]] | None:
        value = log.get(key)
        if isinstance(value, list) and all(
            isinstance(r, dict) and all(number(r.get(f)) for f in fields) for r in value
        ):
            return value
        return None

    clean: dict[str, Any] = {}
    steps, evals = records("steps", ("step", "epoch", "loss")), records("evals", ("epoch", "loss"))
    if steps and evals:
        clean["steps"], clean["evals"] = steps, evals
    for key in ("trainable_params", "total_params"):
        if isinstance(log.get(key), int) and not isinstance(log[key], bool) and log[key] > 0:
            clean[key] = log[key]
    for key in ("base_checksum_before", "base_checksum_after"):
        if isinstance(log.get(key), str):
            clean[key] = log[key]
    return clean


def _preservation(adapters: list[AdapterInfo], checksum: str, base_row: list[Any]) -> str:
    rows = []
    verdicts = []
    for info in adapters:
        before = info.log.get("base_checksum_before")
        after = info.log.get("base_checksum_after")
        if before and after:
            same = before == after == checksum
            verdicts.append(same)
            verdict = "unchanged" if same else "DIFFERENT"
        else:
            verdict = "no training record (not trained by softprompt)"
        rows.append(
            f"<tr><td>{escape(info.name)}</td><td><code>{_short(before)}</code></td>"
            f"<td><code>{_short(after)}</code></td><td>{verdict}</td></tr>"
        )
    summary = (
        "The base model's weights are unchanged by training: their SHA-256 before and "
        "after each training run equals that of the model loaded for this report."
        if verdicts and all(verdicts)
        else "Checksums below; compare them to judge whether the base model is unchanged."
    )
    base_losses = ", ".join(f"{escape(r.data)}: {r.loss:.3f}" for r in base_row)
    return (
        "<h2>Knowledge preservation</h2>"
        f"<p>{summary} Base weights now: <code>{checksum}</code>.</p>"
        "<table><tr><th>adapter</th><th>base sha256 before training</th>"
        "<th>after training</th><th>verdict</th></tr>" + "".join(rows) + "</table>"
        f"<p>The base model's own losses (first row of the matrix below) are "
        f"measured with no prompt at all: {base_losses}.</p>"
    )


def _eval_section(
    adapters: list[AdapterInfo], datasets: list[Texts], matrix: list[list[Any]]
) -> str:
    labels = ["base model"] + [a.name for a in adapters]
    own = {
        (i + 1, j)
        for i, a in enumerate(adapters)
        for j, d in enumerate(datasets)
        if a.owns(d.source)
    }
    best = [min(row[j].loss for row in matrix) for j in range(len(datasets))]
    head = "".join(f"<th>{escape(d.source)}</th>" for d in datasets)
    body = []
    for i, row in enumerate(matrix):
        cells = []
        for j, result in enumerate(row):
            classes = " ".join(
                c for c, on in [("own", (i, j) in own), ("best", result.loss == best[j])] if on
            )
            mark = " &#9733;" if (i, j) in own else ""
            cells.append(
                f'<td class="{classes}">{result.loss:.3f}{mark}'
                f"<br><small>ppl {result.perplexity:.1f}</small></td>"
            )
        body.append(f"<tr><th>{escape(labels[i])}</th>{''.join(cells)}</tr>")
    image = io.BytesIO()
    plot_heatmap(
        [[r.loss for r in row] for row in matrix], labels, [d.source for d in datasets], own, image
    )
    return (
        "<h2>Evaluation: mean loss per token (lower is better)</h2>"
        "<p>&#9733; marks an adapter on its own domain; bold is the lowest loss in a column. "
        f"Tokens scored per dataset: {', '.join(str(r.tokens) for r in matrix[0])}.</p>"
        f"<table class=matrix><tr><th>model</th>{head}</tr>{''.join(body)}</table>"
        f'<img alt="loss heatmap" src="{png_data_uri(image)}">'
    )


def _task_section(tasks: list[TaskResult]) -> str:
    """Accuracy of each baseline and adapter (rows) on each dataset and metric (columns), and
    each confusion matrix of rank classification as a heatmap."""
    models = list(dict.fromkeys(_model_label(t) for t in tasks))
    columns = list(dict.fromkeys((t.data, t.metric) for t in tasks))
    cell = {(_model_label(t), t.data, t.metric): t for t in tasks}
    best = {c: max(t.accuracy for t in tasks if (t.data, t.metric) == c) for c in columns}
    head = "".join(f"<th>{escape(d)}<br><small>{escape(m)}</small></th>" for d, m in columns)
    body = []
    for model in models:
        cells = []
        for data, metric in columns:
            t = cell.get((model, data, metric))
            if t is None:
                cells.append("<td></td>")
                continue
            norm = (
                f"<br><small>length-normalised {t.accuracy_norm:.3f}</small>"
                if t.accuracy_norm is not None
                else ""
            )
            classes = "best" if t.accuracy == best[(data, metric)] else ""
            cells.append(f'<td class="{classes}">{t.accuracy:.3f}{norm}</td>')
        body.append(f"<tr><th>{escape(model)}</th>{''.join(cells)}</tr>")
    images = []
    for t in tasks:
        if t.metric != "choice" or not t.labels:
            continue
        labels = list(t.labels)
        counts = [[t.labels[g].get(p, 0) for p in labels] for g in labels]
        image = io.BytesIO()
        plot_heatmap(
            counts,
            labels,
            labels,
            {(i, i) for i in range(len(labels))},
            image,
            title=f"{_model_label(t)}\non {Path(t.data).name if '/' in t.data else t.data}",
            colorbar="rows",
            cmap="Blues",
            number="{:.0f}",
            axes=("chosen", "gold"),
        )
        images.append(f'<img alt="confusion matrix" src="{png_data_uri(image)}" width=480>')
    rows = ", ".join(
        f"{escape(d)} {next(t.n for t in tasks if t.data == d)}"
        for d in dict.fromkeys(t.data for t in tasks)
    )
    misses = "".join(
        f"<tr><th>{escape(_model_label(t))}</th><td>{escape(m['prompt'])}</td>"
        f"<td>{escape(m['completion'].strip()) or '(empty)'}</td>"
        f"<td>{escape(m['reference'])}</td></tr>"
        for t in tasks
        for m in t.misses[:2]
    )
    return (
        "<h2>Task accuracy (higher is better)</h2>"
        "<p>The base model zero-shot and with the baselines' context (an instruction, examples "
        "in context) beside each adapter, on the same rows; bold is the best in a column. "
        f"Rows per dataset: {rows}.</p>"
        f"<table class=matrix><tr><th>model</th>{head}</tr>{''.join(body)}</table>"
        + (f"<div class=pair>{''.join(images)}</div>" if images else "")
        + (
            "<h3>Some misses</h3><table class=gen><tr><th>model</th><th>prompt</th>"
            f"<th>reply</th><th>reference</th></tr>{misses}</table>"
            if misses
            else ""
        )
    )


def _model_label(t: TaskResult) -> str:
    name = t.adapter or "base model"
    return f"{name} ({t.context})" if t.context else name


def _generations(comparisons: list[Any]) -> str:
    parts = ["<h2>Before / after: generations</h2>"]
    for c in comparisons:
        rows = "".join(
            f"<tr><th>{escape(a or 'base model')}</th><td>{escape(text.strip()) or '(empty)'}"
            f"</td></tr>"
            for a, text in c.completions.items()
        )
        parts.append(f"<h3>{escape(c.prompt)}</h3><table class=gen>{rows}</table>")
    return "".join(parts)


def _adapter_section(spm: SoftPromptModel, info: AdapterInfo, view: Any) -> str:
    config = info.config
    trainable = info.log.get("trainable_params") or int(spm.adapters[info.name].weights.numel())
    base_params = sum(p.numel() for p in spm.model.parameters())
    total = info.log.get("total_params") or base_params + trainable
    facts = [
        ("folder", str(info.folder)),
        ("type", f"{config.get('peft_type')} / {config.get('task_type')}"),
        ("virtual tokens", str(config.get("num_virtual_tokens"))),
        ("token dim", str(config.get("token_dim"))),
        ("trainable params", f"{trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)"),
        ("made for", str(config.get("base_model_name_or_path"))),
    ]
    for key in ("data", "eval_data", "init", "epochs", "lr", "batch_size", "max_length", "seed"):
        if key in info.training:
            facts.append((key.replace("_", " "), str(info.training[key])))
    table = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts)
    curve = "<p>No loss log in this folder (not trained by softprompt).</p>"
    if info.log.get("steps") and info.log.get("evals"):
        image = io.BytesIO()
        plot_losses(
            SimpleNamespace(name=info.name, steps=info.log["steps"], evals=info.log["evals"]), image
        )
        curve = f'<img alt="loss curve of {escape(info.name)}" src="{png_data_uri(image)}">'
    if getattr(view, "method", "prompt") == "prefix":
        layers = "".join(
            f"<tr><td>{x.layer}</td><td>{x.key_norm:.2f}</td><td>{x.model_key_norm:.2f}</td>"
            f"<td>{x.value_norm:.2f}</td><td>{x.model_value_norm:.2f}</td></tr>"
            for x in view.layers
        )
        return (
            f"<h3>{escape(info.name)}</h3><div class=pair><table>{table}</table>{curve}</div>"
            "<h4>Inspect: mean key and value norms per layer, against the model's own for "
            "real tokens</h4><table class=inspect><tr><th>layer</th><th>keys</th>"
            "<th>model's keys</th><th>values</th><th>model's values</th></tr>"
            f"{layers}</table>"
        )
    rows = "".join(
        f"<tr><td>{t.index}</td><td>{t.norm:.2f}</td><td>{t.norm_z:+.1f}</td>"
        f"<td>{t.norm_percentile:.0f}</td><td>"
        + ", ".join(f"<code>{escape(repr(n.token))}</code> {n.cosine:.2f}" for n in t.nearest)
        + "</td></tr>"
        for t in view.tokens
    )
    return (
        f"<h3>{escape(info.name)}</h3><div class=pair><table>{table}</table>{curve}</div>"
        f"<h4>Inspect: nearest vocabulary tokens (cosine) per virtual token</h4>"
        f"<p>Vocabulary row norms: mean {view.vocab_norm_mean:.2f}, "
        f"std {view.vocab_norm_std:.2f}.</p>"
        "<table class=inspect><tr><th>#</th><th>norm</th><th>z</th><th>percentile</th>"
        f"<th>nearest tokens</th></tr>{rows}</table>"
    )


def _short(value: Any) -> str:
    return escape(str(value)[:16] + "...") if value else "-"


_HEAD = (
    """<!doctype html><html lang=en><head><meta charset=utf-8>
"""
    + GENERATOR_META
    + """
<meta name=viewport content="width=device-width, initial-scale=1">
<title>softprompt report</title><style>
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666}table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.own{outline:2px solid #222;outline-offset:-2px}td.best{font-weight:bold}
.matrix td{text-align:right}.gen td{max-width:780px}img{max-width:100%}
.pair{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px}
</style></head><body>"""
)
