"""Fuzzing the file loader, the library scan and ``inspect`` with malformed adapter files."""
