"""Incremental training loop, optimizer-state surgery and FLOPs accounting."""
