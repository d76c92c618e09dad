"""Jurisdiction profiles as data: one JSON file per province mapping (see docs/province.md)."""
