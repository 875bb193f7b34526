"""Converters from public checkpoint formats to agejax prior directories."""
