"""The inference core on the host: requests, the scheduler, the page manager and the output
processor. Plain Python and numpy, no JAX: tested without a model, by hand-made model outputs.

    Scheduler.schedule() -> SchedulerOutput -> (the worker runs it) -> ModelOutput
    Scheduler.update(SchedulerOutput, ModelOutput) -> OutputProcessor.process(...) -> RequestOutputs
"""
