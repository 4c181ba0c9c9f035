"""Datasets, benchmarks, class-incremental streams, input pipelines and loaders."""
