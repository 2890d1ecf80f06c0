"""Shipped gin recipes. A package, so that gin reads them by package path from any folder."""
