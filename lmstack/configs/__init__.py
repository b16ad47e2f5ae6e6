"""Reusable config pieces: the base schema every experiment starts from, and model sizes."""
