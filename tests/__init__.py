"""Test package (a package so that spawned ranks can import `tests.spawn` and the test modules)."""
