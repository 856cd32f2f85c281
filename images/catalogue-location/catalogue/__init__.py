"""airlock's feature catalogue: a Dagster project laid out as a user's would be, one Dagster feature per asset
or job, each ending as it should (SUCCESS, or the FAILURE it is built to show). Tests run it through the storage
boundary (in process, and in hardened containers), so every storage call a feature makes is exercised."""
