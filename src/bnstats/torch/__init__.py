"""PyTorch tools for batch norm's test-time statistics (optional extra; torch is imported only
under this package)."""
