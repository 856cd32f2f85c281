"""A run-status sensor and an asset sensor: both read the instance through the appliance."""

import dagster as dg

from catalogue.partitions import daily_revenue


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, minimum_interval_seconds=5)
def success_counter(context: dg.RunStatusSensorContext) -> dg.SkipReason:
    return dg.SkipReason(f"saw {context.dagster_run.job_name} succeed")


@dg.asset_sensor(asset_key=daily_revenue.key, minimum_interval_seconds=5)
def revenue_watch(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry) -> dg.SkipReason:
    return dg.SkipReason(f"daily_revenue materialized in run {asset_event.run_id}")


sensors = [success_counter, revenue_watch]
