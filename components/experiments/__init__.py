"""Experiments over many trainings: the Optuna study (tune, its storage) and scratch vs transfer
(compare). Imports every package before it (core .. monitoring)."""
