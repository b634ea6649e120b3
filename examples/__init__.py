"""Runnable examples of atlas-pipeline adapters."""
