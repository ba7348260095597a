"""The trained tiny project (`trained_template`) lives in tests/conftest.py, shared with the
CLI tests; modules here import `trained_copy` from this file."""

from tests.conftest import trained_copy  # noqa: F401
