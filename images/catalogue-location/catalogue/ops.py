"""Op jobs: dynamic outputs, op config, the multiprocess executor, and a run that fails then retries."""

import dagster as dg


class ScaleConfig(dg.Config):
    factor: int = 2


@dg.op(out=dg.DynamicOut(int))
def fan_out() -> object:
    for n in range(4):
        yield dg.DynamicOutput(n, mapping_key=f"item_{n}")


@dg.op
def scale(config: ScaleConfig, n: int) -> int:
    return n * config.factor


@dg.op
def gather(context: dg.OpExecutionContext, values: list[int]) -> int:
    context.log.info(f"gathered {sorted(values)}")
    return sum(values)


@dg.job(config={"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}})
def dynamic_job() -> None:
    """Dagster's default executor, multiprocess with two workers: each step a child process of the run."""
    gather(fan_out().map(scale).collect())


@dg.op(retry_policy=dg.RetryPolicy(max_retries=2))
def flaky(context: dg.OpExecutionContext) -> str:
    """Fails on its first attempt: the op-level retry makes the run succeed."""
    if context.retry_number == 0:
        raise dg.RetryRequested(max_retries=2)
    return f"succeeded on attempt {context.retry_number + 1}"


@dg.job
def retry_job() -> None:
    flaky()


@dg.op
def always_fails() -> None:
    raise RuntimeError("this op fails on purpose (the catalogue's intended FAILURE)")


@dg.job(tags={"dagster/max_retries": "1"})
def failing_job() -> None:
    always_fails()


jobs = [dynamic_job, retry_job, failing_job]
