"""Render the report's blocks as one self-contained HTML page and a markdown twin.

The HTML page embeds every figure as a base64 PNG ``data:`` URI and its style sheet
inline, loads nothing else and contains no JavaScript, so it opens offline and can be
attached to a message. The markdown file links the same figures as PNG files written
beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Literal

#: Inline style sheet of the HTML page.
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
p.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.4em 0.8em; }
p.missing { color: #777; font-style: italic; }
p.conclusion { background: #eef5ff; border-left: 4px solid #2a6fdb; padding: 0.6em 0.9em; }
p.note { font-size: 0.85em; color: #555; }
"""


@dataclass
class Table:
    """A table of preformatted cells.

    Attributes:
        caption: Title shown above the table.
        header: Column names.
        rows: Cells, one list per row, as long as ``header``.
        table_id: HTML id of the table, so tests and links can find it.
    """

    caption: str
    header: list[str]
    rows: list[list[str]]
    table_id: str = ""

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(
                    f"table {self.caption!r} has a row of {len(row)} cells for {len(self.header)} columns: {row}"
                )


@dataclass
class Image:
    """A PNG figure.

    Attributes:
        name: File stem of the PNG written beside the markdown file.
        caption: Text shown under the figure.
        png: The PNG bytes.
    """

    name: str
    caption: str
    png: bytes


@dataclass
class Text:
    """A paragraph.

    Attributes:
        text: The paragraph, plain text.
        kind: ``text``, ``note`` (small print), ``warning`` (an honesty flag),
            ``missing`` (a step that was not run) or ``conclusion``.
    """

    text: str
    kind: Literal["text", "note", "warning", "missing", "conclusion"] = "text"


Block = Table | Image | Text


@dataclass
class Section:
    """A titled part of the report.

    Attributes:
        title: Heading.
        anchor: HTML id of the heading.
        blocks: Contents, in order.
    """

    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)


def png_data_uri(png: bytes) -> str:
    """Encode PNG bytes as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_table(table: Table) -> str:
    """Render a table as HTML."""
    id_attribute = f' id="{html.escape(table.table_id)}"' if table.table_id else ""
    lines = [f"<table{id_attribute}>", f"<caption>{html.escape(table.caption)}</caption>"]
    lines.append("<thead><tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header) + "</tr></thead>")
    lines.append("<tbody>")
    for row in table.rows:
        lines.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def html_block(block: Block) -> str:
    """Render one block as HTML."""
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Image):
        return (
            f'<figure id="figure-{html.escape(block.name)}"><img alt="{html.escape(block.caption)}" '
            f'src="{png_data_uri(block.png)}"><figcaption>{html.escape(block.caption)}</figcaption></figure>'
        )
    return f'<p class="{block.kind}">{html.escape(block.text)}</p>'


def render_html(title: str, sections: list[Section]) -> str:
    """Render the report as one self-contained HTML page."""
    contents = "".join(
        f'<li><a href="#{html.escape(section.anchor)}">{html.escape(section.title)}</a></li>'
        for section in sections
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<nav><ul>{contents}</ul></nav>",
    ]
    for section in sections:
        parts.append(f'<section id="{html.escape(section.anchor)}">')
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [html_block(block) for block in section.blocks]
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def markdown_cell(text: str) -> str:
    """Escape a table cell for markdown: pipes and line breaks would split it."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_block(block: Block) -> str:
    """Render one block as markdown; a figure links ``<name>.png`` beside the file."""
    if isinstance(block, Table):
        lines = [f"**{block.caption}**", ""]
        lines.append("| " + " | ".join(markdown_cell(cell) for cell in block.header) + " |")
        lines.append("|" + "|".join("---" for _ in block.header) + "|")
        lines += ["| " + " | ".join(markdown_cell(cell) for cell in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Image):
        return f"![{block.caption}]({block.name}.png)\n\n*{block.caption}*"
    prefixes = {"warning": "> **Warning:** ", "missing": "*", "note": "", "text": "", "conclusion": "> "}
    suffix = "*" if block.kind == "missing" else ""
    return prefixes[block.kind] + block.text + suffix


def render_markdown(title: str, sections: list[Section]) -> str:
    """Render the report as markdown."""
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        for block in section.blocks:
            parts += [markdown_block(block), ""]
    return "\n".join(parts)


def images(sections: list[Section]) -> list[Image]:
    """Return every figure of the report, in order."""
    return [block for section in sections for block in section.blocks if isinstance(block, Image)]
