"""Deciding, with neither Ray nor torch: the controller's state machine, its phase states, the
failure and scaling policies, step accounting and the observers of what happens."""
