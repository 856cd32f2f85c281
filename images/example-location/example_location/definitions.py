"""A small but real Dagster code location, used by the quickstart and the tests.

- ``numbers_job``: several ops in a fan-out/fan-in graph.
- ``raw_numbers -> squares -> summary``: an asset graph, with ``assets_job`` materializing it.
- ``every_five_minutes``: a schedule for ``numbers_job``.
- ``new_numbers_sensor``: a sensor that keeps a cursor (the last batch it saw) and requests a run per batch.
"""

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


@dg.sensor(job=numbers_job, minimum_interval_seconds=30)
def new_numbers_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Pretend a new batch appears on every evaluation; the cursor remembers the last one requested."""
    last = int(context.cursor) if context.cursor else 0
    batch = last + 1
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"batch-{batch}", tags={"batch": str(batch)})],
        cursor=str(batch),
    )


defs = dg.Definitions(
    assets=[raw_numbers, squares, summary],
    jobs=[numbers_job, assets_job],
    schedules=[every_five_minutes],
    sensors=[new_numbers_sensor],
)
