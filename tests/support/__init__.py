"""Helpers shared by the test suite (and bench/): random-weight VAEs, servers on 127.0.0.1, stubs."""
