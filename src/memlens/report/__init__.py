"""The report: figures (matplotlib) and a self-contained HTML page (jinja2) built from the results store."""

from memlens.report.build import build_report

__all__ = ["build_report"]
