"""A second code location from the same image (`--module catalogue.regional`): its own code server, its own
artifact volume, and daily assets of its own, so one backfill can span two locations."""

import dagster as dg

from catalogue.partitions import daily


@dg.asset(partitions_def=daily, code_version="1")
def regional_orders(context: dg.AssetExecutionContext) -> dict[str, int]:
    return {"eu": int(context.partition_key[-2:]), "us": 2 * int(context.partition_key[-2:])}


@dg.asset(partitions_def=daily, code_version="1")
def regional_totals(regional_orders: dict[str, int]) -> int:
    """Reads its upstream through the IO manager: from the location's artifact volume when run later."""
    return sum(regional_orders.values())


# In-process: each run one process (the catalogue location shows the multiprocess default).
defs = dg.Definitions(assets=[regional_orders, regional_totals], executor=dg.in_process_executor)
