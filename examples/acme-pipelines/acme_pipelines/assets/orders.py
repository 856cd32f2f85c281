"""Orders: raw -> cleaned -> stats. The stats use `humanize`, a dependency beyond Dagster."""

import dagster as dg
import humanize

from acme_pipelines.resources import OrderFeed


@dg.asset(group_name="orders")
def raw_orders(feed: OrderFeed) -> list[dict]:
    return feed.fetch()


@dg.asset(group_name="orders")
def cleaned_orders(raw_orders: list[dict]) -> list[dict]:
    return [o for o in raw_orders if o["amount"] > 0]


@dg.asset(group_name="orders")
def order_stats(context: dg.AssetExecutionContext, cleaned_orders: list[dict]) -> dg.MaterializeResult:
    total = sum(o["amount"] for o in cleaned_orders)
    context.log.info(f"{len(cleaned_orders)} orders worth {humanize.intword(total)}")
    return dg.MaterializeResult(metadata={"orders": len(cleaned_orders), "total": humanize.intword(total)})


@dg.asset_check(asset=cleaned_orders)
def no_negative_amounts(cleaned_orders: list[dict]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=all(o["amount"] >= 0 for o in cleaned_orders))
