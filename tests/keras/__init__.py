"""Tests of bnstats.keras (run only in processes without torch: see conftest)."""
