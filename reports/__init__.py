"""Paper-style tables and plots rendered from a results table (issue #5)."""
