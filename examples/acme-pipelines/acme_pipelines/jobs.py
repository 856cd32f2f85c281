"""Jobs: the order assets as one job, and an op job with config."""

import dagster as dg


class ReportConfig(dg.Config):
    recipients: int = 3


@dg.op
def build_report(context: dg.OpExecutionContext, config: ReportConfig) -> str:
    line = f"nightly report for {config.recipients} recipients"
    context.log.info(line)
    return line


@dg.job
def nightly_report() -> None:
    build_report()


orders_job = dg.define_asset_job("orders_job", selection=dg.AssetSelection.groups("orders"))
