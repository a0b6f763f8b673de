"""Plain-PyTorch definitions of every op: the truth for the tests and the always-available backend."""
