"""Partitioned assets with partitioned upstreams: daily -> daily, hourly -> daily, static, multi, dynamic.

Each downstream asset reads its upstream through the IO manager, and the code versions make Dagster compute
data versions, which reads the upstream partitions' latest tags (events.get_latest_tags_by_partition).
"""

import dagster as dg

START = "2026-11-01"
daily = dg.DailyPartitionsDefinition(start_date=START, end_date="2026-11-25")
hourly = dg.HourlyPartitionsDefinition(start_date=f"{START}-00:00", end_date="2026-11-03-00:00")
regions = dg.StaticPartitionsDefinition(["eu", "us", "apac"])
date_by_region = dg.MultiPartitionsDefinition({"date": daily, "region": regions})
customers = dg.DynamicPartitionsDefinition(name="customers")


@dg.asset(partitions_def=daily, code_version="1")
def daily_orders(context: dg.AssetExecutionContext) -> list[int]:
    day = int(context.partition_key[-2:])
    return [day * n for n in range(1, 6)]


@dg.asset(partitions_def=daily, code_version="1")
def daily_revenue(daily_orders: list[int]) -> dg.Output[int]:
    revenue = sum(daily_orders)
    return dg.Output(revenue, metadata={"revenue": revenue})


@dg.asset(partitions_def=hourly, code_version="1")
def hourly_clicks(context: dg.AssetExecutionContext) -> int:
    return int(context.partition_key[-5:-3]) + 1


@dg.asset(partitions_def=daily, deps=[hourly_clicks], code_version="1")
def daily_clicks(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """hourly -> daily through the default time-window mapping: the day's 24 hours."""
    hours = context.instance.get_materialized_partitions(hourly_clicks.key)
    window = context.partition_time_window
    count = sum(1 for h in hours if window.start.strftime("%Y-%m-%d") in h)
    return dg.MaterializeResult(metadata={"hours_materialized": count})


@dg.asset(partitions_def=regions)
def region_targets(context: dg.AssetExecutionContext) -> dict[str, int]:
    return {"region": len(context.partition_key)}


@dg.asset(partitions_def=date_by_region)
def regional_sales(context: dg.AssetExecutionContext) -> str:
    keys = context.partition_key.keys_by_dimension
    return f"{keys['date']}/{keys['region']}"


@dg.asset(partitions_def=customers)
def customer_profile(context: dg.AssetExecutionContext) -> str:
    return f"profile of {context.partition_key}"


@dg.asset(partitions_def=daily, backfill_policy=dg.BackfillPolicy.single_run(), code_version="1")
def daily_summary_single_run(context: dg.AssetExecutionContext, daily_revenue: dict[str, int]) -> dg.MaterializeResult:
    """A single-run backfill (BackfillPolicy.single_run): one run covers a range of partitions. It reads each
    upstream partition through the IO manager but returns no value: Dagster's filesystem IO manager cannot store
    one output for many partitions (it says so), so the result is metadata, as Dagster's docs advise."""
    context.log.info(f"{len(daily_revenue)} days in one run: {context.partition_key_range}")
    return dg.MaterializeResult(metadata={"total_revenue": sum(daily_revenue.values())})


assets = [daily_orders, daily_revenue, hourly_clicks, daily_clicks, region_targets, regional_sales,
          customer_profile, daily_summary_single_run]
