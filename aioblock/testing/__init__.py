"""Test tools that ship with the library: fault injection and crash-state reconstruction."""
