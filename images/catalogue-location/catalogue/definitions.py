"""The catalogue's Definitions: every module's assets, checks, jobs and sensors, and the asset jobs tests run."""

import dagster as dg

from catalogue import checks, ops, partitions, sensors

daily_job = dg.define_asset_job("daily_job", selection=["daily_orders", "daily_revenue"],
                                partitions_def=partitions.daily)
hourly_job = dg.define_asset_job("hourly_job", selection=["hourly_clicks"], partitions_def=partitions.hourly)
feed_job = dg.define_asset_job("feed_job", selection=["feed_digest", "eager_report"])

defs = dg.Definitions(
    assets=[*partitions.assets, *checks.assets],
    asset_checks=checks.asset_checks,
    jobs=[*ops.jobs, daily_job, hourly_job, feed_job],
    sensors=[*sensors.sensors, dg.AutomationConditionSensorDefinition("automation", target=dg.AssetSelection.all(),
                                                                      minimum_interval_seconds=5)],
)
