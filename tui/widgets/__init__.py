"""Widgets the console's screens share (they render what they are given; no I/O)."""
