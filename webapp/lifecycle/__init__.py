"""A task's life, and a batch's: every status change as one named, fenced function.

The web app (services, views) and the workers (jobs/) both call these; no other module writes a
task's or a batch's `status`. Changes that other systems hear about (webhooks) and money held for
a task (budgets) are written in the same transaction as the status change they follow.
"""
