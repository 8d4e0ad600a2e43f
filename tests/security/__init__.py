"""Regression tests of the security findings (issue 14): each reproduces an attack through
the HTTP API against a real regproxy app and asserts that it now fails safely."""
