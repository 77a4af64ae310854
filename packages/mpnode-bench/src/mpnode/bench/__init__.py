"""mpnode.bench (see the repository README)."""
