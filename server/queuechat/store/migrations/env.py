"""Alembic's environment for queuechat's schema.

queuechat runs Alembic from code (queuechat.store.migrations; `queuechat db ...`), never from the
alembic command line: the caller opens the connection, takes the migration lock, begins the
transaction, and passes the connection in config.attributes["connection"]. Here the migrations
run on it with the options every run shares (batch mode on SQLite, type comparison, ...).
"""

from alembic import context

from queuechat.store.migrations import context_options

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("queuechat runs its migrations itself: use `queuechat db upgrade`, not the alembic command")

context.configure(connection=connection, **context_options(connection.dialect.name))
with context.begin_transaction():
    context.run_migrations()
