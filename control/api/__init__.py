"""``hpcgate control api``: registration API, admin API and Prometheus HTTP SD, served by granian."""
