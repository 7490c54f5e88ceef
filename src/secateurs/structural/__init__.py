"""Structural pruning: remove channels, neurons, heads, hidden dims and blocks for real."""
