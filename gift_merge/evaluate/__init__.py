"""Evaluation of models through lm-evaluation-harness."""
