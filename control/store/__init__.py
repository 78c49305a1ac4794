"""Data access for the control plane: SQL for tenants, keys, models, jobs and endpoints.

Every module here takes an asyncpg connection (or pool) and returns typed rows; none of them
knows about HTTP, Redis or probing. Races are settled by constraints in the schema, not by
reading and then writing in application code.
"""
