"""Alembic migrations of the feedback store (run by training.feedback.db.upgrade)."""
