"""Test support: conformance suites for each service kind and shared fixtures."""
