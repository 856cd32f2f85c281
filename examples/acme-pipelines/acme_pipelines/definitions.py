"""The project's Definitions: what `dagster api grpc --package-name acme_pipelines.definitions` serves."""

import dagster as dg

from acme_pipelines.assets import orders
from acme_pipelines.jobs import nightly_report, orders_job
from acme_pipelines.resources import OrderFeed

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([orders]),
    asset_checks=[orders.no_negative_amounts],
    jobs=[orders_job, nightly_report],
    resources={"feed": OrderFeed(region="eu")},
)
