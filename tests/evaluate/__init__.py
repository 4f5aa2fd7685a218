"""Tests of the lm-eval tasks shipped in gift_merge.evaluate.tasks and their metrics."""
