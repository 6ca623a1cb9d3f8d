"""PyTorch tools (optional extra)."""
