"""The results of any scorer as a terminal table, ``report.json``, ``report.md`` and ``metrics.png``.

Every writer reads the scorer's ``metrics`` (which columns, labels, which way is better, descriptions) and
``references`` (published rows, by metric key), and the rows' ``metrics`` mappings; none knows a metric by name.
Optional metrics that no row measured are left out of the table, the markdown and the plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, PngImagePlugin

from sdtune import __version__
from sdtune.eval.core import EvalSpec, Metric, Reference, Row, Scorer
from sdtune.files import atomic_path, write_text
from sdtune.grid import load_font
from sdtune.runs import SOFTWARE

# Plot colours, one per LoRA scale (matplotlib's first six, so the picture looks familiar).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
GREY = (150, 150, 150)


def fmt(value: float | None) -> str:
    """A metric value as the table and report show it: 3 decimals, "-" when not measured."""
    return "-" if value is None else f"{value:.3f}"


def shown_metrics(metrics: Sequence[Metric], rows: list[Row]) -> list[Metric]:
    """The metrics to show: every required one, and each optional one that some row measured."""
    return [m for m in metrics if not m.optional or any(r.metrics.get(m.key) is not None for r in rows)]


def _images(row: Row) -> str:
    return str(row.images) + (f" ({row.failed} failed)" if row.failed else "")


def _reference_value(reference: Reference, metric: Metric) -> str:
    return fmt(reference.values[metric.key]) if metric.key in reference.values else ""


# --------------------------------------------------------------------------------------------------------
# Terminal


def table(scorer: Scorer, rows: list[Row], best: Row | None = None) -> str:
    """The terminal table: one line per row (* = recommended), then the scorer's reference rows, if any."""
    metrics = shown_metrics(scorer.metrics, rows)
    head = ["", "checkpoint", "step", "LoRA", *[f"{m.label} {m.arrow}" for m in metrics], "images"]
    body = [["*" if r is best else "", r.checkpoint, "-" if r.step is None else str(r.step), f"{r.lora_scale:g}",
             *[fmt(r.metrics.get(m.key)) for m in metrics], _images(r)] for r in rows]
    refs = scorer.references
    extra = [["", ref.short or ref.name, "", "", *[_reference_value(ref, m) for m in metrics], ""]
             for ref in (refs.rows if refs else ())]
    widths = [max(len(line[i]) for line in [head, *body, *extra]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    rule = "-" * len(line([w * "-" for w in widths]))
    lines = [line(head), rule, *map(line, body)]
    if refs and extra:
        lines += [rule, *map(line, extra), f"{refs.source}: {refs.note}, for reference"]
    return "\n".join(lines)


def _quoted(scorer: Scorer, best: Row) -> str:
    """``" (DINO 0.712, CLIP-T 0.301)"``: the metrics the scorer quotes beside a recommendation, if any."""
    labels = {m.key: m.label for m in scorer.metrics}
    quoted = ", ".join(f"{labels[k]} {fmt(best.metrics.get(k))}" for k in scorer.quote)
    return f" ({quoted})" if quoted else ""


def recommendation(scorer: Scorer, best: Row) -> str:
    """``"step-000400 at LoRA scale 1 (DINO 0.712, CLIP-T 0.301)"``: the row and the metrics the scorer quotes."""
    return f"{best.checkpoint} at LoRA scale {best.lora_scale:g}{_quoted(scorer, best)}"


# --------------------------------------------------------------------------------------------------------
# report.json, report.md


def report_data(spec: EvalSpec, scorer: Scorer, rows: list[Row], best: Row | None) -> dict[str, Any]:
    """Everything report.json holds: the settings, every number (per prompt too), the recommendation and its
    rule, the metrics' definitions and the reference rows."""
    refs = scorer.references
    return {
        "sdtune_version": __version__,
        "run": spec.run,
        "model": spec.model,
        "scorer": scorer.name,
        "loras": [{"checkpoint": label, "file": str(Path(f).resolve()), "step": spec.steps.get(label)}
                  for label, f in spec.loras],
        "identifier": spec.identifier,
        "class_noun": spec.class_noun,
        "prompt_set": spec.prompt_set,
        "prompts": spec.prompts,
        "class_prompt": spec.class_prompt if scorer.class_images else None,
        "images_per_prompt": spec.images_per_prompt,
        "lora_scales": spec.lora_scales,
        "guidance_scale": spec.guidance,
        "settings": asdict(spec.settings),
        **scorer.report_fields(spec),
        "metrics": {m.key: {"label": m.label, "higher_is_better": m.higher_is_better, "description": m.description}
                    for m in scorer.metrics},
        "rows": [asdict(r) for r in rows],
        "recommendation": None if best is None else {
            "checkpoint": best.checkpoint, "step": best.step, "lora_scale": best.lora_scale,
            "metrics": dict(best.metrics), "rule": scorer.rule},
        "references": None if refs is None else {
            "source": refs.source, "note": refs.note, "plotted": refs.plotted,
            "rows": [{"name": r.name, "values": r.values} for r in refs.rows]},
    }


def _markdown_table(scorer: Scorer, metrics: list[Metric], rows: list[Row], best: Row | None) -> list[str]:
    lines = ["| checkpoint | step | LoRA scale | " + " | ".join(f"{m.label} {m.arrow}" for m in metrics)
             + " | images |", "|---|---:|---:|" + "---:|" * len(metrics) + "---:|"]
    for r in rows:
        name = f"**{r.checkpoint}**" if r is best else r.checkpoint
        lines.append(f"| {name} | {'-' if r.step is None else r.step} | {r.lora_scale:g} | "
                     + " | ".join(fmt(r.metrics.get(m.key)) for m in metrics) + f" | {_images(r)} |")
    refs = scorer.references
    for ref in refs.rows if refs else ():
        lines.append(f"| *{ref.name}* | | | " + " | ".join(_reference_value(ref, m) for m in metrics) + " | |")
    if refs:
        lines += ["", f"Reference rows: {refs.source}, {refs.note}."]
    return lines


def _per_prompt(metrics: list[Metric], best: Row) -> list[str]:
    """The recommended row, prompt by prompt, for the metrics the scorer measures per prompt."""
    keys = [m for m in metrics if any(m.key in p for p in best.per_prompt)]
    if not keys:
        return []
    lines = [f"## Per prompt ({best.name})", "", "| prompt | " + " | ".join(m.label for m in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    lines += [f"| {p['prompt']} | " + " | ".join(fmt(p.get(m.key)) for m in keys) + " |" for p in best.per_prompt]
    return [*lines, ""]


def markdown(spec: EvalSpec, scorer: Scorer, rows: list[Row], best: Row | None, plot: bool = True) -> str:
    """report.md: settings, the table with the reference rows, the recommendation, the plot, the recommended
    row per prompt, what each metric measures and the scorer's notes."""
    metrics = shown_metrics(scorer.metrics, rows)
    s, n = spec.settings, spec.images_per_prompt
    class_prompt = f", class prompt \"{spec.class_prompt}\"" if scorer.class_images else ""
    lines = [
        f"# {scorer.title}: {spec.run}",
        "",
        f"- prompts: {spec.prompt_set} ({len(spec.prompts)}) x {n} images, seeds 0-{n - 1}; LoRA scales "
        f"{', '.join(f'{x:g}' for x in spec.lora_scales)}",
        f"- identifier `{spec.identifier}`, class `{spec.class_noun}`{class_prompt}",
        f"- sampling: `{spec.model}`, {s.steps} steps {s.scheduler}, guidance {spec.guidance:g}, "
        f"{s.width}x{s.height}",
        *scorer.report_lines(spec),
        "",
        *_markdown_table(scorer, metrics, rows, best),
        "",
    ]
    if best is not None:
        lines += [f"**Recommended: `{best.checkpoint}` at LoRA scale {best.lora_scale:g}**"
                  f"{_quoted(scorer, best)}. Rule: {scorer.rule}.", ""]
    if plot:
        lines += ["![metrics against training step](metrics.png)", ""]
    if best is not None:
        lines += _per_prompt(metrics, best)
    lines += ["## Metrics", "", *[f"- {m.label} {m.arrow}: {m.description}" for m in metrics], "", "## Notes", "",
              *scorer.notes(spec),
              "- Images: `samples/<checkpoint>.png`, each cell with its sidecar in `samples/<checkpoint>_cells/` "
              "(`sdtune sample --replay` renders one again).", ""]
    return "\n".join(lines)


def write_reports(out: Path, spec: EvalSpec, scorer: Scorer, rows: list[Row], best: Row | None) -> list[Path]:
    """``report.json``, ``report.md`` and, when some row has a number, ``metrics.png`` in ``out``."""
    metrics = shown_metrics(scorer.metrics, rows)
    plot = any(r.metrics.get(m.key) is not None for r in rows for m in metrics)
    written = [write_text(out / "report.json", json.dumps(report_data(spec, scorer, rows, best), indent=2) + "\n"),
               write_text(out / "report.md", markdown(spec, scorer, rows, best, plot))]
    if plot:
        reference = scorer.references.plotted_row() if scorer.references else None
        written.append(plot_metrics(rows, out / "metrics.png", metrics, best, reference))
    return written


# --------------------------------------------------------------------------------------------------------
# metrics.png

PANEL_W, PANEL_H, LEFT, RIGHT, TOP, BOTTOM, LEGEND_H = 380, 280, 64, 16, 34, 46, 28


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour, dash: int = 6) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=colour, width=1)
        x += 2 * dash


class _Axes:
    """One panel's frame: data coordinates -> pixels."""

    def __init__(self, origin: tuple[int, int], x_range: tuple[float, float], values: list[float]):
        ox, oy = origin
        self.x0, self.x1, self.y0, self.y1 = ox + LEFT, ox + PANEL_W - RIGHT, oy + TOP, oy + PANEL_H - BOTTOM
        self.x_lo, self.x_hi = x_range
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        pad = max((hi - lo) * 0.1, 0.01)
        self.lo, self.hi = lo - pad, hi + pad

    def px(self, x: float, y: float) -> tuple[float, float]:
        return (self.x0 + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.x1 - self.x0),
                self.y1 - (y - self.lo) / (self.hi - self.lo) * (self.y1 - self.y0))


def _frame(draw: ImageDraw.ImageDraw, ax: _Axes, origin: tuple[int, int], title: str,
           ticks: list[tuple[float, str]], axis: str) -> None:
    """Title, frame, y ticks, x ticks (``ticks``: (x, label or "")) and the x axis name of one panel."""
    font, small = load_font(15), load_font(12)
    ox, oy = origin
    draw.text((ax.x0, oy + 8), title, fill="black", font=font)
    draw.rectangle([ax.x0, ax.y0, ax.x1, ax.y1], outline=(120, 120, 120))
    for i in range(5):
        y = ax.lo + (ax.hi - ax.lo) * i / 4
        _, py = ax.px(ax.x_lo, y)
        draw.line([(ax.x0 - 4, py), (ax.x0, py)], fill="black")
        draw.text((ox + 4, py - 7), f"{y:.3f}", fill="black", font=small)
    for x_value, text in ticks:
        x, _ = ax.px(x_value, ax.lo)
        draw.line([(x, ax.y1), (x, ax.y1 + 4)], fill="black")
        if text:
            draw.text((x - draw.textlength(text, font=small) / 2, ax.y1 + 6), text, fill="black", font=small)
    draw.text(((ax.x0 + ax.x1) / 2 - draw.textlength(axis, font=small) / 2, ax.y1 + 24), axis, fill="black",
              font=small)


def _legend(draw: ImageDraw.ImageDraw, y: float, scales: list[float], reference: Reference | None) -> None:
    small = load_font(12)
    x = 8.0
    for j, scale in enumerate(scales):
        draw.line([(x, y + 7), (x + 22, y + 7)], fill=PALETTE[j % len(PALETTE)], width=3)
        text = f"LoRA x{scale:g}"
        draw.text((x + 28, y), text, fill="black", font=small)
        x += 40 + draw.textlength(text, font=small)
    if reference is not None:
        _dashed(draw, x, x + 24, y + 7, GREY, dash=4)
        draw.text((x + 30, y), reference.name, fill="black", font=small)
        x += 46 + draw.textlength(reference.name, font=small)
    draw.ellipse([x, y + 1, x + 12, y + 13], outline="black", width=2)
    draw.text((x + 18, y), "recommended", fill="black", font=small)


def plot_metrics(rows: list[Row], path: str | Path, metrics: Sequence[Metric], best: Row | None = None,
                 reference: Reference | None = None) -> Path:
    """One panel per metric against training step (rows' order when steps are unknown), one line per LoRA
    scale; the reference row's value dashed in grey where it has one; the recommended point ringed."""
    path = Path(path)
    scales = list(dict.fromkeys(r.lora_scale for r in rows))
    labels = list(dict.fromkeys(r.checkpoint for r in rows))
    steps = {r.checkpoint: r.step for r in rows}
    use_steps = all(s is not None for s in steps.values())
    xs = {c: float(steps[c]) if use_steps else float(i) for i, c in enumerate(labels)}  # type: ignore[arg-type]
    x_lo, x_hi = min(xs.values()), max(xs.values())
    x_pad = (x_hi - x_lo) * 0.06 or 1.0  # keep the first and last points off the frame
    every = max(1, len(labels) // 6)  # at most ~6 x labels, so they never overlap
    ticks = [(xs[c], (str(steps[c]) if use_steps else c) if i % every == 0 or i == len(labels) - 1 else "")
             for i, c in enumerate(labels)]
    columns = min(3, len(metrics))
    panel_rows = -(-len(metrics) // columns)
    image = Image.new("RGB", (columns * PANEL_W, panel_rows * PANEL_H + LEGEND_H), "white")
    draw = ImageDraw.Draw(image)

    for k, metric in enumerate(metrics):
        origin = ((k % columns) * PANEL_W, (k // columns) * PANEL_H)
        ref = reference.values.get(metric.key) if reference is not None else None
        values = [v for r in rows if (v := r.metrics.get(metric.key)) is not None] + ([] if ref is None else [ref])
        ax = _Axes(origin, (x_lo - x_pad, x_hi + x_pad), values)
        title = f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)"
        _frame(draw, ax, origin, title, ticks, "training step" if use_steps else "checkpoint")
        if ref is not None:
            _dashed(draw, ax.x0, ax.x1, ax.px(ax.x_lo, ref)[1], GREY)
        for j, scale in enumerate(scales):
            colour = PALETTE[j % len(PALETTE)]
            points = [ax.px(xs[r.checkpoint], v) for r in rows
                      if r.lora_scale == scale and (v := r.metrics.get(metric.key)) is not None]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if best is not None and (v := best.metrics.get(metric.key)) is not None:
            x, y = ax.px(xs[best.checkpoint], v)
            draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline="black", width=2)

    _legend(draw, panel_rows * PANEL_H + 6, scales, reference)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)  # sdtune's mark: a later eval may replace it
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
