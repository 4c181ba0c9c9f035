"""Null-space projection: the old inputs' covariance per expert bank, and its enforcement."""
