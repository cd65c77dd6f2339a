"""Tests of the task layer (loradrop.tasks); a package so its conftest does not shadow tests/conftest.py."""
