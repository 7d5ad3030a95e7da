"""Bundled demo data: the fictional notes of one demo user."""
