"""Networks that use the memory."""
