"""Small shared helpers: shape checks, atomic file writes, seeding."""
