"""Shard sets: the contract, the converters that write them, and `verify`."""
