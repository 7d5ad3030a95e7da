"""Whole federations on one machine through Flower's simulation engine."""
