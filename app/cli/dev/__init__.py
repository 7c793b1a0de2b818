"""Developer services for a machine that has none: the mock model and an embedded Redis."""
