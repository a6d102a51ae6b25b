"""mkdocs hook: `<!-- cli-help: COMMAND -->` in a page becomes that command's `--help` text, taken from
the installed sparseseg at build time, so the option reference never drifts from the code."""
import re

_MARK = re.compile(r"<!-- cli-help: ([a-z]+) -->")


def _help(command: str) -> str:
    from click.testing import CliRunner

    from sparseseg.cli import main

    result = CliRunner().invoke(main, [command, "--help"], terminal_width=100)
    if result.exit_code != 0:
        raise RuntimeError(f"sparseseg {command} --help failed: {result.output}")
    return "```text\n" + result.output.replace("Usage: main", "Usage: sparseseg").rstrip() + "\n```"




def _module_table() -> str:
    """Every module of sparseseg/ with the first line of its docstring, read from the source tree."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = ["| module | what it holds |", "|---|---|"]
    for path in sorted((root / "sparseseg").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        first = doc.strip().split("\n")[0].replace("|", "\\|") if doc.strip() else ""
        rows.append(f"| `{path.relative_to(root).as_posix()}` | {first} |")
    return "\n".join(rows)


_TABLE = "<!-- module-table -->"


def on_page_markdown(markdown, page, config, files):
    markdown = _MARK.sub(lambda m: _help(m.group(1)), markdown)
    return markdown.replace(_TABLE, _module_table()) if _TABLE in markdown else markdown
