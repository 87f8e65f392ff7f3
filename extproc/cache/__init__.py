"""Response cache: stored answers served back as JSON or as an SSE stream in the client's schema."""
