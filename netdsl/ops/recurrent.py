"""Recurrent cells and attention (owned by the recurrent-networks work)."""
