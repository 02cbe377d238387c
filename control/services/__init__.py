"""Decisions: state transitions, dispatch, validation (no SQL, no protobuf)."""
