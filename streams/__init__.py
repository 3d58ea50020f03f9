"""The trajectory stream: schema, Redis Streams transport, and the embedded Redis server."""
