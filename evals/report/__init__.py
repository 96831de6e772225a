"""Comparison report of an experiment's variants: one self-contained HTML page and a markdown twin."""
