"""The test suite, by component (see tests/README.md); ``tests.support`` holds the shared
helpers and conftest.py the shared fixtures."""
