"""One self-contained HTML page: tables, figures, configuration and software versions.

:func:`write_html_report` puts everything into ONE file (figures embedded as base64 PNG, no
external resources), so it can be mailed, archived as an MLflow artifact or opened offline.
Both reports use it or its pieces: the study's (:mod:`igconda.report`) and the comparison's
(:mod:`igconda.comparison_report`: :data:`PAGE_CSS`, :func:`figure_png`,
:func:`software_versions`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure

from igconda.io_utils import atomic_write

#: Packages whose versions the report records.
VERSION_PACKAGES = ("torch", "monai", "ray", "mlflow", "numpy", "igconda")


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages the results depend on ("not installed" if absent)."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def figure_png(figure: Any) -> bytes:
    if isinstance(figure, Figure):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return buffer.getvalue()
    path = Path(figure)
    if not path.is_file():
        raise FileNotFoundError(f"figure file not found: {path}")
    return path.read_bytes()


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif"}

PAGE_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eef; }
tbody tr:nth-child(even) { background: #f7f7f7; }
pre { background: #f4f4f4; padding: .8em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #ddd; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em 1em; }
nav ul { columns: 2; }
figure { margin: 1em 0; }
figcaption { font-size: 13px; color: #555; }
"""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "section"


def write_html_report(
    path: str | Path,
    *,
    title: str,
    tables: Mapping[str, pd.DataFrame],
    figures: Mapping[str, Figure | str | Path],
    config: Mapping[str, Any],
    versions: Mapping[str, str],
    notes: Sequence[str] = (),
) -> Path:
    """Write one self-contained HTML page: notes, tables, figures, configuration, versions.

    Nothing is linked: figures are embedded as base64 data URIs (matplotlib figures are
    rendered to PNG; paths are read and embedded), tables are HTML, the configuration is YAML in
    a ``<pre>`` block. All text is HTML-escaped. The file is written to a temporary name beside
    ``path`` and renamed, so a reader never sees a half-written page.

    Args:
        path: the ``.html`` file to write (parent folders are created).
        title: page title.
        tables: section title → DataFrame (MultiIndex columns are kept).
        figures: section title → matplotlib Figure or image file (PNG, JPEG, SVG).
        config: the configuration to show (e.g. ``StudyConfig.to_dict()``).
        versions: software name → version (see :func:`software_versions`).
        notes: remarks shown at the top (missing stages, caveats).

    Returns:
        ``path``.
    """
    path = Path(path)
    esc = html.escape
    sections: list[tuple[str, str]] = []
    for name, frame in tables.items():
        # A plain 0..n-1 row index says nothing; named indexes (cohorts) are kept.
        show_index = not isinstance(frame.index, pd.RangeIndex) or frame.index.name is not None
        body = frame.to_html(na_rep="–", escape=True, border=0, index=show_index,
                             float_format=lambda v: f"{v:.4g}")
        sections.append((f"Table: {name}", f'<div class="table">{body}</div>'))
    for name, figure in figures.items():
        suffix = ".png" if isinstance(figure, Figure) else Path(figure).suffix.lower()
        mime = _MIME.get(suffix, "image/png")
        data = base64.b64encode(figure_png(figure)).decode("ascii")
        sections.append((f"Figure: {name}", f'<figure><img alt="{esc(name)}" '
                                            f'src="data:{mime};base64,{data}">'
                                            f"<figcaption>{esc(name)}</figcaption></figure>"))
    config_text = yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False)
    sections.append(("Configuration", f"<pre>{esc(config_text)}</pre>"))
    version_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                           for k, v in versions.items())
    sections.append(("Software versions", f"<table>{version_rows}</table>"))

    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{PAGE_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>", f"<p>Generated {esc(created)} by igconda.report.</p>",
    ]
    if notes:
        items = "".join(f"<li>{esc(str(n))}</li>" for n in notes)
        parts.append(f'<div class="notes" id="notes"><strong>Notes</strong><ul>{items}</ul></div>')
    slugs = [f"s{i}-{_slug(name)}" for i, (name, _) in enumerate(sections)]
    toc = "".join(f'<li><a href="#{s}">{esc(name)}</a></li>' for s, (name, _) in zip(slugs, sections, strict=True))
    parts.append(f"<nav><h2>Contents</h2><ul>{toc}</ul></nav>")
    for slug, (name, body) in zip(slugs, sections, strict=True):
        parts.append(f'<section id="{slug}"><h2>{esc(name)}</h2>{body}</section>')
    parts.append("</body></html>")

    path.parent.mkdir(parents=True, exist_ok=True)
    page = "\n".join(parts)
    # 0644 whatever the umask: a report is meant to be shared.
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"), mode=0o644)
