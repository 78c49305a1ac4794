"""Building the gateway tables from PostgreSQL and publishing them to Redis."""
