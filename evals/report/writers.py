"""A table's cells and how a table is written: Markdown, LaTeX (escaped to pure ASCII, stacked +-, panels
scaled to the line) and CSV (plain numbers, each +- in its own column)."""

from __future__ import annotations

import csv
import io
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from cocomix.files import atomic_write_text


@dataclass
class Cell:
    """A number with an optional +- (`spread`); `text` replaces both (e.g. "not reached")."""

    mean: float | None
    spread: float | None = None
    digits: int = 2
    signed: bool = False
    mark: str = ""  # e.g. DAGGER
    text: str | None = None

    @property
    def missing(self) -> bool:
        return self.text is None and (self.mean is None or math.isnan(self.mean))

    def number(self, value: float) -> str:
        return f"{value:{'+' if self.signed else ''}.{self.digits}f}"

    def md(self) -> str:
        if self.text is not None:
            return self.text
        if self.missing:
            return "–"
        return self.number(self.mean) + (f" ± {self.spread:.{self.digits}f}" if self.spread is not None else "") + self.mark

    def tex(self) -> str:
        if self.text is not None:
            return tex_escape(self.text)
        if self.missing:
            return "--"
        value = self.number(self.mean) + tex_escape(self.mark)
        if self.spread is None:
            return value
        return tex_stack([value, f"{{\\scriptsize$\\pm${self.spread:.{self.digits}f}}}"], "r")  # +- below: narrower


MISSING = Cell(None)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell | str]]
    spread: dict[str, str] = field(default_factory=dict)  # column -> CSV suffix of its +- ("se", "std", "ci95")
    notes_md: list[str] = field(default_factory=list)  # lines under the Markdown table
    notes_tex: list[str] = field(default_factory=list)  # the same in LaTeX (already escaped)
    md_only: tuple[str, ...] = ("mlflow runs",)  # columns left out of the .tex
    # The .tex as several tabulars one above the other, each these columns (default: one, all)
    tex_panels: list[list[str]] = field(default_factory=list)

    def name_runs(self, tracked_by: str) -> None:
        """Head the run-id columns by the tracker that holds the runs ("mlflow runs" by default)."""
        def rename(h: str) -> str:
            return h.replace("mlflow run", f"{tracked_by} run", 1) if h.startswith("mlflow run") else h
        self.header = [rename(h) for h in self.header]
        self.md_only = tuple(rename(h) for h in self.md_only)
        self.tex_panels = [[rename(h) for h in panel] for panel in self.tex_panels]
        self.spread = {rename(k): v for k, v in self.spread.items()}


TEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
               "{": r"\{", "}": r"\}", "^": r"\^{}", "~": r"\~{}"}
TEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "–": "--", "—": "---", "†": r"$^\dagger$", "×": r"$\times$",
               "≥": r"$\geq$", "≤": r"$\leq$", "−": "$-$", "²": r"$^2$", "·": r"$\cdot$", "σ": r"$\sigma$",
               "Σ": r"$\Sigma$", "√": r"$\surd$", "’": "'", "“": "``", "”": "''"}


def tex_escape(s: str) -> str:
    """Text -> LaTeX that pdflatex compiles with no extra package: specials escaped, known non-ASCII
    characters as math or dashes, any other one reduced to its ASCII letters (accents dropped)."""
    out = []
    for ch in s:
        if ch in TEX_SPECIAL:
            out.append(TEX_SPECIAL[ch])
        elif ch in TEX_UNICODE:
            out.append(TEX_UNICODE[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?")
    return "".join(out)


def tex_stack(lines: list[str], align: str = "c") -> str:
    """Lines (already LaTeX) stacked in one table cell, top line on the row's baseline."""
    if len(lines) == 1:
        return lines[0]
    return f"\\begin{{tabular}}[t]{{@{{}}{align}@{{}}}}" + r"\\[-1pt]".join(lines) + r"\end{tabular}"


def tex_header(text: str, align: str) -> str:
    """A column name on two lines (split at its last space or slash) to keep number columns narrow."""
    cut = max(text.rfind(" "), text.rfind("/"))
    if cut <= 0 or len(text) <= 8:
        return tex_escape(text)
    return tex_stack([tex_escape(text[:cut]), tex_escape(text[cut + 1:])], align)


def _csv_number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else format(value, ".10g")


def write_table(out_dir: Path, name: str, table: Table, caption: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table.header, table.rows

    def md_cell(c):
        return c.md() if isinstance(c, Cell) else c

    md = [f"<!-- {caption} -->", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    for line in table.notes_md:  # footnotes, each its own paragraph under the table
        md += ["", line]
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md) + "\n")

    tex = [r"% cocomix report table; needs \usepackage{booktabs,graphicx}. Wider than the line: scaled to it.",
           r"\begin{table}[t]", r"\centering", f"\\caption{{{tex_escape(caption)}}}", r"\setlength{\tabcolsep}{4pt}"]
    panels = table.tex_panels or [[h for h in header if h not in table.md_only]]
    # Columns with no number in any row stay out of the .tex (e.g. the paper's tasks in a synthetic
    # experiment); a panel left with its key columns only (no number column) is dropped.
    empty = {h for i, h in enumerate(header) if rows and all(isinstance(r[i], Cell) and r[i].missing for r in rows)}
    panels = [[h for h in panel if h not in empty] for panel in panels]
    numbers = {h for i, h in enumerate(header) if any(isinstance(r[i], Cell) for r in rows)}
    if numbers:  # a table of formatted strings only (compute: FLOPs) keeps every panel
        panels = [panel for panel in panels if numbers & set(panel)] or panels[:1]
    for k, panel in enumerate(panels):
        keep = [header.index(h) for h in panel]
        align = "".join("r" if any(isinstance(r[i], Cell) for r in rows) else "l" for i in keep)  # numbers right
        tex += [r"\sbox0{\begin{tabular}{" + align + "}", r"\toprule",
                " & ".join(tex_header(header[i], a) for i, a in zip(keep, align)) + r" \\", r"\midrule"]
        tex += [" & ".join(r[i].tex() if isinstance(r[i], Cell) else tex_escape(r[i]) for i in keep) + r" \\"
                for r in rows]
        tex += [r"\bottomrule", r"\end{tabular}}%",
                r"\ifdim\wd0>\linewidth\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi"]
        if k < len(panels) - 1:
            tex += [r"\par\medskip"]
    if table.notes_tex:
        tex += [r"\par\smallskip{\footnotesize\raggedright " + " ".join(table.notes_tex) + r"\par}"]
    tex += [r"\end{table}"]
    atomic_write_text(out_dir / f"{name}.tex", "\n".join(tex) + "\n")

    csv_header: list[str] = []
    for h in header:
        csv_header += [h, f"{h}_{table.spread[h]}"] if h in table.spread else [h]
    csv_rows = []
    for r in rows:
        out = []
        for h, c in zip(header, r):
            if not isinstance(c, Cell):
                out.append(c)
            elif c.text is not None:
                out.append(c.text)
            else:
                out.append(_csv_number(c.mean))
            if h in table.spread:
                out.append(_csv_number(c.spread) if isinstance(c, Cell) and c.text is None else "")
        csv_rows.append(out)
    buf = io.StringIO()
    csv.writer(buf).writerows([csv_header, *csv_rows])
    atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())
