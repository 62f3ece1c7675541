"""CSV cells that stay data when someone opens the file in a spreadsheet (light: no pandas).

Spreadsheets take a cell that starts with =, +, - or @ (or with a tab or carriage return,
which some strip first) for a formula, so a clip id or an error message crafted as
`=HYPERLINK(...)` would run when a colleague opens a CSV file we wrote. The customary defence
(OWASP's "CSV injection"): such a cell is written with a leading apostrophe, which
spreadsheets show as text. A value that itself starts with an apostrophe gets one more, so
`restored` gives back exactly what `neutralised` was given.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def neutralised(value: str) -> str:
    """`value` as a CSV cell a spreadsheet shows as text."""
    return QUOTE + value if value.startswith((*FORMULA_STARTS, QUOTE)) else value


def restored(cell: str) -> str:
    """The value `neutralised` made `cell` from (a cell it did not change is returned as it is)."""
    return cell[1:] if cell.startswith(QUOTE) and cell[1:].startswith((*FORMULA_STARTS, QUOTE)) else cell
