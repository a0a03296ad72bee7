"""What an evaluation measures and how its results are shaped, whatever computes them.

An ``EvalSpec`` says what to render: for each checkpoint, every prompt (and the class prompt, when the scorer
asks for it) at each LoRA scale with seeds 0..n-1. The images of one (checkpoint, LoRA scale) reach a ``Scorer``
as one ``Rendered``; the scorer returns one ``Row`` each, its numbers in ``Row.metrics`` keyed by
``Metric.key``. The report writers (``sdtune.eval.report``) and the recommendation read only the scorer's
``metrics`` and the rows' mappings.

No torch here: the command line builds its parser from this package without loading a model library.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sdtune.grid import Cell, Settings
from sdtune.images import open_image


@dataclass(frozen=True)
class Metric:
    """One number per row: its key in ``Row.metrics``, the label the table, report and plot show, which way
    is better, and one sentence of what it measures (report.json and report.md)."""

    key: str
    label: str
    higher_is_better: bool
    description: str
    optional: bool = False  # shown only when some row measured it (e.g. PRES needs the class prompt)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass(frozen=True)
class Reference:
    """Published numbers to compare with, by metric key. A key with None: reported as not applicable ("-");
    a key absent: not part of that publication (blank)."""

    name: str  # e.g. "paper: DreamBooth (Stable Diffusion)"
    values: dict[str, float | None]
    short: str | None = None  # for the terminal table, where width is scarce


@dataclass(frozen=True)
class References:
    """Reference rows printed under the measured ones; ``plotted`` names the row drawn dashed in metrics.png."""

    source: str  # citation
    note: str  # how the numbers were obtained, e.g. "30 subjects x 25 prompts x 4 images"
    rows: tuple[Reference, ...]
    plotted: str | None = None

    def plotted_row(self) -> Reference | None:
        return next((r for r in self.rows if r.name == self.plotted), None)


@dataclass
class Row:
    """The numbers of one checkpoint at one LoRA scale. A metric's value None: not measured (no images, or no
    pairs for a diversity). ``per_prompt``: one dict per prompt with ``prompt`` and any metric keys."""

    checkpoint: str
    step: int | None
    lora_scale: float
    metrics: dict[str, float | None] = field(default_factory=dict)
    images: int = 0
    failed: int = 0
    per_prompt: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.checkpoint} x{self.lora_scale:g}"


@dataclass
class EvalSpec:
    """One ``sdtune eval``, resolved from the run folder and the flags: what is rendered, and from what."""

    run: str  # what RUN named, for the report's title
    model: str
    loras: list[tuple[str, str]]  # (label, LoRA file), in training order
    subject_dir: Path | None  # the real subject photos; None for a scorer that reads none (Scorer.subject_photos)
    identifier: str
    class_noun: str
    prompt_set: str  # e.g. 'dreambench-live', 'micro-world' or the prompt file
    prompts: list[str]  # what is drawn, identifier and class filled in
    steps: dict[str, int | None] = field(default_factory=dict)  # label -> training step
    images_per_prompt: int = 4
    lora_scales: list[float] = field(default_factory=lambda: [1.0])
    guidance: float = 7.5
    settings: Settings = field(default_factory=Settings)
    class_prompt: str = ""
    revision: str | None = None
    variant: str | None = None
    dtype: str = "fp32"
    device: str | None = None
    model_options: dict = field(default_factory=dict)  # the run's model.vae / prediction_type / clip_skip


@dataclass
class Rendered:
    """The images of one (checkpoint, LoRA scale), by prompt in seed order; a prompt whose every cell failed
    is absent. ``failed``: cells of this row with no image."""

    checkpoint: str
    step: int | None
    lora_scale: float
    images: dict[str, list[Image.Image]]
    failed: int = 0

    def row(self, metrics: dict[str, float | None], images: int, per_prompt: list[dict]) -> Row:
        """This row's ``Row`` with the scorer's numbers."""
        return Row(self.checkpoint, self.step, self.lora_scale, metrics, images, self.failed, per_prompt)


class Scorer(Protocol):
    """What one ``--metrics`` choice measures, and how. ``sdtune.eval.run.run_eval`` calls, in order:
    ``prepare`` (before anything renders: fail early), ``score``, ``recommend``; the report writers read the
    rest."""

    name: str  # the --metrics value
    title: str  # report.md's heading
    metrics: tuple[Metric, ...]
    references: References | None
    quote: tuple[str, ...]  # metric keys quoted beside the recommendation
    class_images: bool  # also draw EvalSpec.class_prompt for every row
    subject_photos: bool  # reads the real subject photos (EvalSpec.subject_dir, --subject-dir)
    steps: int  # sampling defaults that suit the scorer's model
    guidance: float
    rule: str  # the recommendation rule, in words

    def templates(self, class_noun: str) -> tuple[list[str], str]:
        """(prompt templates with ``{identifier}`` / ``{class}``, the prompt set's name)."""
        ...

    def prepare(self, spec: EvalSpec) -> None:
        """Check inputs and load what scoring needs."""
        ...

    def score(self, spec: EvalSpec, rendered: Iterable[Rendered]) -> list[Row]:
        """One Row per Rendered, in order."""
        ...

    def recommend(self, rows: list[Row]) -> Row | None:
        """The row to use, or None when no row qualifies."""
        ...

    def report_fields(self, spec: EvalSpec) -> dict[str, Any]:
        """What report.json adds for this scorer (its models, inputs, sources)."""
        ...

    def report_lines(self, spec: EvalSpec) -> list[str]:
        """report.md's header lines for this scorer (markdown list items)."""
        ...

    def notes(self, spec: EvalSpec) -> list[str]:
        """report.md's notes for this scorer (markdown list items)."""
        ...


def eval_cells(spec: EvalSpec, label: str, class_images: bool) -> list[Cell]:
    """The cells of one checkpoint: prompts (+ the class prompt) x scales x seeds 0..n-1.

    Every prompt gets the same seeds: ``sdtune.grid.layout`` draws a full prompts x seeds grid."""
    prompts = spec.prompts + ([spec.class_prompt] if class_images else [])
    cells = [Cell(p, seed, spec.guidance, scale, label) for p in prompts for scale in spec.lora_scales
             for seed in range(spec.images_per_prompt)]
    return list(dict.fromkeys(cells))  # a prompt file may repeat a prompt, or hold the class prompt


def cell_path(cells_dir: Path, index: int) -> Path:
    """Where ``sdtune.sample.run_sample`` writes cell ``index`` of a grid (its sidecar: ``.json``)."""
    return cells_dir / f"cell-{index:04d}.png"


def read_rendered(spec: EvalSpec, folders: dict[str, Path], class_images: bool) -> Iterator[Rendered]:
    """Each (checkpoint, LoRA scale)'s images from the cells folders ``run.render`` filled, in training order
    then scale order; one row in memory at a time. A missing image is a failed cell."""
    for label, _ in spec.loras:
        cells = eval_cells(spec, label, class_images)
        for scale in spec.lora_scales:
            row = Rendered(label, spec.steps.get(label), scale, {})
            for i, cell in enumerate(cells):
                if cell.lora_scale != scale:
                    continue
                path = cell_path(folders[label], i)
                if path.is_file():
                    row.images.setdefault(cell.prompt, []).append(open_image(path, "eval"))
                else:
                    row.failed += 1
            yield row
