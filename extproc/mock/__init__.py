"""A mock LLM provider speaking the OpenAI and Anthropic wire formats, for tests, benchmarks and the demo."""
