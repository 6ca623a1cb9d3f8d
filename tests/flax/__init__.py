"""Tests of bnstats.flax (run only in processes without torch: see conftest)."""
