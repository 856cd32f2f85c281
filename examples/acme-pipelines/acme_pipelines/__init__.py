"""Acme's pipelines: order ingestion and reporting, as a Dagster project laid out in modules."""
