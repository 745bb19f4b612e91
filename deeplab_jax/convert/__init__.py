"""Weight conversion from other frameworks."""
