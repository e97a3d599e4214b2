"""Adapters that gather inputs for the pure core from other libraries' objects."""
