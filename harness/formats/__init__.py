"""Checkpoint readers. Each yields ``(key, tensor)`` one tensor at a time so that two checkpoints
of any size can be compared with bounded memory."""
