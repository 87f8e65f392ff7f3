"""Token and cost accounting: the usage record, prices, the tokenizer for estimates, the sinks
that make records durable (Redis stream + aggregates, spool) and the ledger they end in."""
