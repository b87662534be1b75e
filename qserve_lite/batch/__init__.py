"""`qserve-lite batch`: JSONL prompts in, JSONL completions out, per shard (rows.py, worker.py, command.py),
run by jobs/."""
