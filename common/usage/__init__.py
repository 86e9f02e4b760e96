"""Usage and billing: reports over the usage rollups, for the API, the CLI and a dashboard alike.

``parse_query`` reads a request's parameters, ``report`` answers from the rollups, ``as_json`` /
``as_csv`` render it, ``spent`` is what budgets read.
"""

from common.usage.query import FILTERS, GROUPS, UsageQuery, parse_query
from common.usage.render import as_csv, as_json, csv_filename
from common.usage.report import UsageGroup, UsageReport, report, spent

__all__ = ["FILTERS", "GROUPS", "UsageGroup", "UsageQuery", "UsageReport", "as_csv", "as_json",
           "csv_filename", "parse_query", "report", "spent"]
