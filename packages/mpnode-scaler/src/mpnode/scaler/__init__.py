"""mpnode.scaler (see the repository README)."""
