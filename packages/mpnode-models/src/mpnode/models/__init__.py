"""mpnode.models (see the repository README)."""
