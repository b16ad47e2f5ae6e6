"""The config schema: the base config every experiment starts from (reusable pieces live in
the top-level ``configs`` package)."""
