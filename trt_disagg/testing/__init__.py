"""Test fixtures that ship with the package (used by tests and benchmarks): network-namespace test hosts."""
