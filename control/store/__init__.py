"""The data layer: every SQL statement, as named functions taking a session."""
