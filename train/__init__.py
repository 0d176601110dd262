"""The user's side of a job: tasks (model, optimizer, data, loss), data slicing, the train step.

Nothing in this package imports Ray: it runs the same under our coordinator, under torchrun, or in
a plain test process.
"""
