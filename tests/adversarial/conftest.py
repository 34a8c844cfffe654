"""Attack tests: each performs an attack or fault against the real code."""
