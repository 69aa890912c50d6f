"""Shared pytest configuration. Plugins live in their own modules so that each concern stays in one file."""

# tests/_ci_deps.py: with CI=true a declared test dependency that is missing fails the run instead of skipping.
pytest_plugins = ["_ci_deps"]
