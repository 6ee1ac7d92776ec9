"""Tests of igconda.data."""
