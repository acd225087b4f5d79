"""Offline data: context formats (episodes <-> tokens) and the multi-episode slice dataset."""
