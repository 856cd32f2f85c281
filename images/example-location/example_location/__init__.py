"""airlock's example code location: a job, an asset graph, a schedule and a cursor-keeping sensor."""
