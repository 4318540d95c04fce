"""Evaluation harness: one file per task under `tasks/`, run through the public generation API."""
