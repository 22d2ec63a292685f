"""Turning samples into files and numbers."""
