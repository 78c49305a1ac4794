"""PostgreSQL: the schema (plain SQL migrations) and the code that applies it."""
