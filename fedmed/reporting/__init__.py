"""What every fedmed page is made of: :mod:`fedmed.reporting.html` (pages, tables, figures)."""
