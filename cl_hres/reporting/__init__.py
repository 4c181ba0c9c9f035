"""Metrics from the accuracy matrix, forward transfer, tables and plots."""
