"""Asset checks, one of them blocking, and an observable source asset with data versions."""

import dagster as dg

from catalogue.partitions import daily_revenue


@dg.asset_check(asset=daily_revenue, blocking=True)
def revenue_is_positive(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Blocking: a failure would stop what reads daily_revenue. Reads the latest materialization's metadata."""
    event = context.instance.get_latest_materialization_event(daily_revenue.key)
    materialization = event.asset_materialization if event else None
    revenue = materialization.metadata["revenue"].value if materialization else 0
    return dg.AssetCheckResult(passed=revenue > 0, metadata={"revenue": revenue})


@dg.observable_source_asset
def vendor_feed() -> dg.DataVersion:
    """An external table airlock cannot see into: its version is what we observe."""
    return dg.DataVersion("feed-v1")


@dg.asset(deps=[vendor_feed], code_version="2")
def feed_digest() -> str:
    return "digest of feed-v1"


@dg.asset_check(asset=feed_digest)
def digest_not_empty(feed_digest: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=bool(feed_digest))


@dg.asset(deps=[feed_digest], automation_condition=dg.AutomationCondition.eager())
def eager_report() -> str:
    """Declarative automation: the daemon requests it whenever feed_digest is newer."""
    return "report"


assets = [vendor_feed, feed_digest, eager_report]
asset_checks = [revenue_is_positive, digest_not_empty]
