"""Persistence: SQLModel tables and the transaction runner."""

from .db import Database, WriteStats, make_engine, sqlite_url

__all__ = ["Database", "WriteStats", "make_engine", "sqlite_url"]
