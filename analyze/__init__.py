"""Offline analysis of stored activations."""
