"""Carrying out, on Ray: the TrainWorker actor and the group that places, forms and polls it."""
