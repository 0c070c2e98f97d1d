"""Persistence: SQLModel tables and the transaction runner."""

from .db import Database, Tx, make_engine, sqlite_url

__all__ = ["Database", "Tx", "make_engine", "sqlite_url"]
