"""Alembic environment for the feedback store: runs on the connection db.upgrade passes in.

There is no alembic.ini: db._alembic_config builds the Config in code with ``script_location`` set
to this folder and the open connection in ``config.attributes["connection"]``.
"""

from alembic import context

from training.feedback.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the feedback store's migrations through training.feedback.db.upgrade")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
