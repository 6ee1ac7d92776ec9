"""The comparison's outputs: tables as markdown and CSV, Figs. 4 and 6 as PNG (+ their numbers
as CSV), and one self-contained HTML page with the best cell of each column in bold.

:func:`write_comparison` writes everything into one folder::

    comparison.html     tables, figures (embedded PNG), runs used and skipped, versions
    comparison.md       every table in markdown (best in **bold**)
    tables/table<N>_<metric>.{md,csv}   one per metric; the CSV is long form with a ``best`` column
    tables/runs.csv, tables/skipped.csv the score runs used and those left out (with the reason)
    figures/fig4_lesion_size.{png,csv}  mean ± SEM per size bin, one line per method label
    figures/fig6_size_suv.{png,csv}     mean per (size, SUVmean) cell, one row per method label

The page's images and style come from :mod:`igconda.report_html` (its own page writer escapes every
cell, so it cannot show the bold best cells).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from igconda.comparison import LOWER_IS_BETTER, MetricTable, ScoredRuns, metric_tables
from igconda.comparison_figures import (
    FIGURE_METRICS,
    HEATMAP_BINS,
    SIZE_LIMIT,
    heatmap_cells,
    heatmap_figure,
    size_bins,
    size_figure,
)
from igconda.evaluation import METRIC_TITLES
from igconda.io_utils import atomic_write
from igconda.report_html import PAGE_CSS, figure_png, software_versions

#: What the figures show, for captions and notes (the contract's definitions).
DEFINITIONS = (
    "Normalised lesion size = lesion pixels / body pixels of the slice; normalised lesion SUVmean "
    "= mean intensity over the slice's lesion pixels / the slice's maximum intensity.",
    "Means and standard deviations (population, ddof = 0) run over unhealthy slices; "
    "'internal (all)' and 'external (all)' pool every slice of that role.",
)


def _md_escape(text: str) -> str:
    # Method titles hold |x−x̂|: an unescaped pipe would split a markdown table cell.
    return str(text).replace("|", "\\|")


def _caption(table: MetricTable) -> str:
    best = "lowest" if table.metric in LOWER_IS_BETTER else "highest"
    caption = f"Table {table.number}: {table.title}. Bold: the {best} mean of each column"
    if table.not_marked:
        caption += f", {', '.join(table.not_marked)} not competing"
    return caption + "."


def _with_tau(table: MetricTable) -> pd.DataFrame:
    """The cells, with a τ column for Dice@τ (the threshold each method's row used)."""
    cells = table.cells.copy()
    if table.metric == "dice_tau":
        taus = table.numbers.groupby("method_label", sort=False)["tau"].first()
        cells.insert(0, "τ", [("–" if pd.isna(taus.get(lb)) else f"{taus.get(lb):g}")
                              for lb in cells.index])
    return cells


def table_markdown(table: MetricTable) -> str:
    """One table in markdown: a method per row, a group per column, the best cells in bold."""
    cells = _with_tau(table)
    lines = [f"### {_md_escape(_caption(table))}", "",
             "| Method | " + " | ".join(_md_escape(c) for c in cells.columns) + " |",
             "|---" * (len(cells.columns) + 1) + "|"]
    for label, row in cells.iterrows():
        shown = [f"**{v}**" if c in table.best.columns and table.best.at[label, c] else v
                 for c, v in row.items()]
        lines.append(f"| {_md_escape(label)} | " + " | ".join(_md_escape(v) for v in shown) + " |")
    return "\n".join(lines) + "\n"


def table_html(table: MetricTable) -> str:
    """One table as HTML (every text escaped; the best cells in ``<strong>``)."""
    esc = html.escape
    cells = _with_tau(table)
    head = "".join(f"<th>{esc(str(c))}</th>" for c in ["Method", *cells.columns])
    body = []
    for label, row in cells.iterrows():
        tds = [f"<th>{esc(str(label))}</th>"]
        for c, v in row.items():
            bold = c in table.best.columns and table.best.at[label, c]
            tds.append(f"<td><strong>{esc(v)}</strong></td>" if bold else f"<td>{esc(v)}</td>")
        body.append(f"<tr>{''.join(tds)}</tr>")
    return (f"<table><caption>{esc(_caption(table))}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _frame_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, escape=True, border=0, na_rep="–")


def write_comparison_page(path: str | Path, *, title: str, tables: Sequence[MetricTable],
                          figures: Mapping[str, Figure | str | Path], scored: ScoredRuns,
                          notes: Sequence[str] = ()) -> Path:
    """ONE self-contained HTML page: notes, the metric tables, the figures (embedded PNG), the
    score runs used and skipped, software versions. Written atomically, mode 0644."""
    esc = html.escape
    sections = [(f"Table {t.number}: {METRIC_TITLES.get(t.metric, t.metric)}", table_html(t))
                for t in tables]
    for name, figure in figures.items():
        data = base64.b64encode(figure_png(figure)).decode("ascii")
        sections.append((name, f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{esc(name)}</figcaption></figure>"))
    sections.append(("Score runs used", _frame_html(scored.runs)))
    skipped = pd.DataFrame([vars(s) for s in scored.skipped], columns=["run_id", "run_name", "reason"])
    sections.append(("Score runs skipped", _frame_html(skipped) if len(skipped) else "<p>none</p>"))
    versions = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                       for k, v in software_versions().items())
    sections.append(("Software versions", f"<table>{versions}</table>"))
    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(title)}</title><style>{PAGE_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>", f"<p>Generated {esc(created)} by igconda.comparison.</p>"]
    if notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in notes)
        parts.append(f'<div class="notes" id="notes"><strong>Notes</strong><ul>{items}</ul></div>')
    toc = "".join(f'<li><a href="#s{i}">{esc(name)}</a></li>' for i, (name, _) in enumerate(sections))
    parts.append(f"<nav><h2>Contents</h2><ul>{toc}</ul></nav>")
    parts += [f'<section id="s{i}"><h2>{esc(name)}</h2>{body}</section>'
              for i, (name, body) in enumerate(sections)]
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = "\n".join(parts)
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"), mode=0o644)


def comparison_notes(scored: ScoredRuns) -> list[str]:
    """The page's notes: data version(s), runs used and skipped, the figures' definitions."""
    versions = scored.data_versions
    notes = [f"Data version{'s' if len(versions) > 1 else ''}: {', '.join(versions)}"
             + (" (MIXED: the methods were not scored on the same data)" if len(versions) > 1 else ""),
             f"{len(scored.runs)} score run(s) compared; {len(scored.skipped)} skipped."]
    notes += [f"Skipped run {s.run_id} ({s.run_name}): {s.reason}" for s in scored.skipped]
    return notes + list(DEFINITIONS)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _write_png(path: Path, figure: Figure) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110,
                                                             bbox_inches="tight"))
    finally:
        plt.close(figure)


def heatmap_table(scored: ScoredRuns, labels: Sequence[str], bins: int = HEATMAP_BINS) -> pd.DataFrame:
    """Fig. 6's non-empty cells, long form: method_label, metric, suv_bin, size_bin, n, mean."""
    rows = []
    for label in labels:
        mine = scored.scores[scored.scores["method_label"] == label]
        for metric in FIGURE_METRICS:
            means, counts = heatmap_cells(mine, metric, bins=bins)
            for r, c in zip(*counts.nonzero(), strict=True):
                rows.append({"method_label": label, "metric": metric, "suv_bin": int(r),
                             "size_bin": int(c), "n": int(counts[r, c]),
                             "mean": float(means[r, c])})
    return pd.DataFrame(rows, columns=["method_label", "metric", "suv_bin", "size_bin", "n", "mean"])


def write_comparison(output: str | Path, scored: ScoredRuns, *, digits: int = 3,
                     heatmap_labels: Sequence[str] | None = None,
                     title: str = "IgCONDA-PET: comparison of methods") -> dict[str, Path]:
    """Write the tables, figures, ``comparison.md`` and ``comparison.html`` into ``output``.

    Args:
        output: the folder (created).
        scored: from :func:`igconda.comparison.load_scored_runs`.
        digits: decimals in the tables.
        heatmap_labels: the method labels drawn in Fig. 6 (default: all; its CSV has all).
        title: the page's title.

    Returns:
        ``{name: path}`` of every file written (``html``, ``markdown``, ``table<N>``,
        ``fig4``, ``fig6``, ...).
    """
    output = Path(output)
    (output / "tables").mkdir(parents=True, exist_ok=True)
    (output / "figures").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = metric_tables(scored, digits=digits)
    for table in tables:
        stem = output / "tables" / f"table{table.number}_{table.metric}"
        written[f"table{table.number}"] = _write_text(stem.with_suffix(".md"), table_markdown(table))
        written[f"table{table.number}_csv"] = _write_csv(stem.with_suffix(".csv"), table.numbers)
    written["runs"] = _write_csv(output / "tables" / "runs.csv", scored.runs)
    written["skipped"] = _write_csv(output / "tables" / "skipped.csv", pd.DataFrame(
        [vars(s) for s in scored.skipped], columns=["run_id", "run_name", "reason"]))

    binned = size_bins(scored.scores)
    written["fig4_csv"] = _write_csv(output / "figures" / "fig4_lesion_size.csv", binned)
    written["fig4"] = _write_png(output / "figures" / "fig4_lesion_size.png", size_figure(binned))
    # The cells of every method go to the CSV; the figure draws the chosen ones (a row each).
    written["fig6_csv"] = _write_csv(output / "figures" / "fig6_size_suv.csv",
                                     heatmap_table(scored, scored.labels))
    labels = list(heatmap_labels) if heatmap_labels else scored.labels
    written["fig6"] = _write_png(output / "figures" / "fig6_size_suv.png",
                                 heatmap_figure(scored.scores, labels))

    notes = comparison_notes(scored)
    markdown = "\n".join([f"# {title}", "", *[f"- {_md_escape(n)}" for n in notes], "",
                          *[table_markdown(t) for t in tables]])
    written["markdown"] = _write_text(output / "comparison.md", markdown)
    figures = {f"Fig. 4: metrics against normalised lesion size (< {SIZE_LIMIT:g}), "
               "mean ± SEM per bin": written["fig4"],
               f"Fig. 6: mean metric per (normalised lesion size, SUVmean) cell, "
               f"{HEATMAP_BINS} × {HEATMAP_BINS}": written["fig6"]}
    written["html"] = write_comparison_page(output / "comparison.html", title=title, tables=tables,
                                            figures=figures, scored=scored, notes=notes)
    return written
