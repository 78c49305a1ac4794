"""Bulk inference: OpenAI's Files and Batch APIs (served by the control API behind the gateway's
port) and the backfill runner ``hpcgate control batches``. See docs/batch.md."""
