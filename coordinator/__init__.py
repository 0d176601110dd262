"""Elastic training coordinator: launches data-parallel PyTorch jobs as Ray actors."""
