"""Fan-out: the WebSocket tier pushing events to subscribers."""
