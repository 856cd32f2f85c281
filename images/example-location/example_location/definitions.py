"""A small but real Dagster code location, used by the quickstart and the tests.

- ``numbers_job``: several ops in a fan-out/fan-in graph.
- ``raw_numbers -> squares -> summary``: an asset graph, with ``assets_job`` materializing it.
- ``every_five_minutes``: a schedule for ``numbers_job``; ``every_minute`` one for ``assets_job`` (both off until
  started).
- ``new_numbers_sensor``: a sensor that keeps a cursor (the last batch it saw) and requests a run per batch.
- ``asset_watch_sensor``: a sensor that reads the instance (this location's runs, the latest materialization of
  ``raw_numbers``) and says what it saw in its skip reason; it never requests a run.
- ``sleepy_job``, ``hungry_job`` and ``chatty_job``: for trying termination, the memory limit and event
  throughput (a run that waits; one that allocates until the container's memory limit stops it; one that logs
  ``count`` events, ``interval`` seconds apart).
"""

import time

import dagster as dg


@dg.op
def emit_numbers(context: dg.OpExecutionContext) -> list[int]:
    numbers = list(range(1, 11))
    context.log.info(f"emitting {len(numbers)} numbers")
    return numbers


@dg.op
def total(numbers: list[int]) -> int:
    return sum(numbers)


@dg.op
def evens(numbers: list[int]) -> int:
    return sum(1 for n in numbers if n % 2 == 0)


@dg.op
def report(context: dg.OpExecutionContext, total: int, evens: int) -> str:
    line = f"total={total} evens={evens}"
    context.log.info(line)
    print(line)  # lands in the compute logs
    return line


@dg.job
def numbers_job() -> None:
    numbers = emit_numbers()
    report(total(numbers), evens(numbers))


@dg.asset
def raw_numbers() -> list[int]:
    return [3, 1, 4, 1, 5, 9, 2, 6]


@dg.asset
def squares(raw_numbers: list[int]) -> list[int]:
    return [n * n for n in raw_numbers]


@dg.asset
def summary(context: dg.AssetExecutionContext, squares: list[int]) -> dg.MaterializeResult:
    context.log.info(f"{len(squares)} squares")
    return dg.MaterializeResult(metadata={"count": len(squares), "sum": sum(squares)})


assets_job = dg.define_asset_job("assets_job", selection=dg.AssetSelection.all())

every_five_minutes = dg.ScheduleDefinition(name="every_five_minutes", job=numbers_job, cron_schedule="*/5 * * * *")
every_minute = dg.ScheduleDefinition(name="every_minute", job=assets_job, cron_schedule="* * * * *")


@dg.sensor(job=numbers_job, minimum_interval_seconds=30)
def new_numbers_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Pretend a new batch appears on every evaluation; the cursor remembers the last one requested."""
    last = int(context.cursor) if context.cursor else 0
    batch = last + 1
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"batch-{batch}", tags={"batch": str(batch)})],
        cursor=str(batch),
    )


@dg.op(config_schema={"seconds": dg.Field(int, default_value=600)})
def wait_a_while(context: dg.OpExecutionContext) -> None:
    context.log.info(f"sleeping {context.op_config['seconds']} s")
    time.sleep(context.op_config["seconds"])


@dg.job
def sleepy_job() -> None:
    wait_a_while()


@dg.op(config_schema={"count": dg.Field(int, default_value=100), "interval": dg.Field(float, default_value=0.0)})
def log_events(context: dg.OpExecutionContext) -> None:
    for i in range(1, context.op_config["count"] + 1):
        context.log.info(f"event {i}")
        if context.op_config["interval"]:
            time.sleep(context.op_config["interval"])


@dg.job
def chatty_job() -> None:
    log_events()


@dg.op
def allocate_until_stopped(context: dg.OpExecutionContext) -> None:
    chunks = []
    for n in range(1, 100_000):
        chunks.append(b"x" * (64 * 1024 * 1024))  # written, so resident (a zeroed allocation may not be)
        if n % 4 == 0:
            context.log.info(f"holding {n * 64} MiB")


@dg.job(executor_def=dg.in_process_executor)
def hungry_job() -> None:
    allocate_until_stopped()


@dg.sensor(job=assets_job, minimum_interval_seconds=30)
def asset_watch_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """In airlock the instance here reads through the appliance's relay with the location's read-only token."""
    runs = context.instance.get_run_records(dg.RunsFilter(), limit=100)
    latest = context.instance.get_latest_materialization_event(dg.AssetKey("raw_numbers"))
    return dg.SkipReason(f"watching: {len(runs)} runs of this location; raw_numbers "
                         + (f"last materialized by run {latest.run_id}" if latest else "never materialized"))


defs = dg.Definitions(
    assets=[raw_numbers, squares, summary],
    jobs=[numbers_job, assets_job, sleepy_job, hungry_job, chatty_job],
    schedules=[every_five_minutes, every_minute],
    sensors=[new_numbers_sensor, asset_watch_sensor],
)
